// The "Rotary: Run Server Command" quick pick: every command the server advertises,
// plus the extension's own. No `vscode` import: unit-tested under plain node.

export interface CommandPick {
  label: string;
  description: string;
  /** a server command id, run through workspace/executeCommand */
  serverCommand?: string;
  /** an extension command id, run through vscode.commands */
  clientCommand?: string;
}

/** Server commands that editors send by themselves; listed last. */
const REPORTING = new Set(["rotary.suggestionShown", "rotary.suggestionAccepted"]);

/** "rotary.restartWorker" -> "Restart Worker" */
export function humanize(command: string): string {
  const name = command.replace(/^rotary\./, "");
  const words = name.replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/[._-]+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function commandPicks(serverCommands: readonly string[]): CommandPick[] {
  const server = [...serverCommands]
    .sort((a, b) => Number(REPORTING.has(a)) - Number(REPORTING.has(b)) || a.localeCompare(b))
    .map((command) => ({ label: humanize(command), description: command, serverCommand: command }));
  const client: CommandPick[] = [
    { label: "Restart Server", description: "restart rotary lsp", clientCommand: "rotary.client.restartServer" },
    { label: "Show Log", description: "the Rotary output channel", clientCommand: "rotary.client.showLog" },
  ];
  return [...server, ...client];
}
