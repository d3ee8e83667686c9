// Rotary for VS Code: starts `rotary lsp`, shows its inline completions as ghost text,
// reports status, and exposes the server's commands. All completion logic is in the
// server; this file is wiring.
import * as fs from "fs";
import * as os from "os";
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  Middleware,
  ServerOptions,
  State,
  WorkDoneProgress,
  WorkDoneProgressCreateRequest,
} from "vscode-languageclient/node";
import { AcceptanceTracker, AcceptedArgs, acceptedArgsOf, charCount } from "./acceptance";
import { commandPicks } from "./commands";
import { documentSelector, resolveServerPath, sameSettings, serverSettings, ServerSettings, userScopedReader } from "./settings";
import { Progress, ServerStatus, statusView } from "./status";

const SECTION = "rotary";
/** Item commands are rewritten to this one so partial accepts are subtracted. */
const ACCEPTED = "rotary.client.accepted";

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let serverStatus: ServerStatus | undefined;
let progress: Progress | undefined;
let starting: string | undefined = "starting";
let lastSent: ServerSettings | undefined;
const tracker = new AcceptanceTracker();

function config(): vscode.WorkspaceConfiguration {
  return vscode.workspace.getConfiguration(SECTION);
}

/** Workspace values of user-only settings already warned about (once per key and session). */
const warnedWorkspaceKeys = new Set<string>();

function currentServerSettings(): ServerSettings {
  const cfg = config();
  const read = userScopedReader(
    (key, fallback) => cfg.get(key, fallback),
    (key) => cfg.inspect(key),
    (key) => {
      if (warnedWorkspaceKeys.has(key)) {
        return;
      }
      warnedWorkspaceKeys.add(key);
      const message = `${SECTION}.${key} is set in this workspace's settings and was ignored: it is read only from your user settings.`;
      output.warn(message);
      void vscode.window.showWarningMessage(`Rotary: ${message}`);
    },
  );
  return serverSettings(read);
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

function updateStatus(): void {
  const view = statusView(serverStatus, progress, starting);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
  statusItem.backgroundColor = view.error ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  statusItem.command = view.error ? "rotary.client.showLog" : "rotary.client.runServerCommand";
  statusItem.show();
}

function setStatus(status: ServerStatus): void {
  const wasReady = serverStatus?.state === "ready";
  serverStatus = status;
  if (status.state !== "loading") {
    progress = undefined;
  }
  updateStatus();
  const editor = vscode.window.activeTextEditor;
  if (status.state === "ready" && !wasReady && editor && client && vscode.languages.match(clientSelector(), editor.document)) {
    // Keystrokes while the worker loaded got no answer: ask again now that it can.
    void vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
  }
}

function clientSelector(): { scheme: string; language: string }[] {
  return documentSelector(config().get<string[]>("languages", []));
}

/** Middleware: report what is shown, and route full accepts through the tracker. */
const middleware: Middleware = {
  async provideInlineCompletionItems(document, position, context, token, next) {
    const result = await next(document, position, context, token);
    if (!result || token.isCancellationRequested) {
      return result;
    }
    const items = Array.isArray(result) ? result : result.items;
    for (const item of items) {
      const args = acceptedArgsOf(item.command as vscode.Command | undefined);
      if (args) {
        item.command = { title: "Rotary: accepted", command: ACCEPTED, arguments: [document.uri.toString(), args] };
      }
    }
    const first = items[0];
    const firstArgs = first && first.command?.command === ACCEPTED ? (first.command.arguments?.[1] as AcceptedArgs) : undefined;
    if (firstArgs) {
      const text = typeof first.insertText === "string" ? first.insertText : first.insertText.value;
      const key = `${position.line}:${position.character}:${text}`;
      const shown = tracker.onShown(document.uri.toString(), firstArgs.id, charCount(text), key);
      if (shown) {
        void runServerCommand("rotary.suggestionShown", [shown]);
      }
    }
    return result;
  },
};

async function runServerCommand(command: string, args?: unknown[]): Promise<unknown> {
  if (!client || !client.isRunning()) {
    throw new Error("the Rotary server is not running");
  }
  return client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args });
}

function serverCommands(): string[] {
  return client?.initializeResult?.capabilities.executeCommandProvider?.commands ?? [];
}

async function startClient(context: vscode.ExtensionContext): Promise<void> {
  const cfg = config();
  const serverPath = resolveServerPath(cfg.get("serverPath", ""), {
    pathEnv: process.env.PATH ?? "",
    workspaceFolders: (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath),
    extensionPath: context.extensionPath,
    home: os.homedir(),
    isExecutable,
  });
  if (!serverPath) {
    starting = undefined;
    setStatus({ state: "error", message: "rotary executable not found: set rotary.serverPath", latencyMs: null, lastResult: null });
    output.appendLine("rotary executable not found on PATH or in a workspace .venv: set the rotary.serverPath setting.");
    return;
  }
  output.appendLine(`starting ${serverPath} lsp`);
  // stdio without `transport`: TransportKind.stdio would append `--stdio` to the arguments.
  const serverOptions: ServerOptions = { command: serverPath, args: ["lsp"] };
  lastSent = currentServerSettings();
  const clientOptions: LanguageClientOptions = {
    documentSelector: clientSelector(),
    initializationOptions: lastSent,
    outputChannel: output,
    middleware,
    // A failed completion shows nothing; the status bar and the log say why.
    initializationFailedHandler: (error) => {
      output.appendLine(`initialization failed: ${error}`);
      return false;
    },
  };
  client = new LanguageClient("rotary", "Rotary", serverOptions, clientOptions);
  client.onNotification("rotary/status", (params: ServerStatus) => setStatus(params));
  client.onDidChangeState((e) => {
    if (e.newState === State.Stopped && starting === undefined) {
      setStatus({ state: "error", message: "the server stopped", latencyMs: null, lastResult: null });
    }
  });
  starting = "starting the server";
  updateStatus();
  try {
    await client.start();
  } catch (err) {
    starting = undefined;
    setStatus({ state: "error", message: `could not start ${serverPath}: ${err}`, latencyMs: null, lastResult: null });
    return;
  }
  starting = undefined;
  // Show the server's work-done progress (the model loading) in the status bar.
  client.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
    const sub = client!.onProgress(WorkDoneProgress.type, token, (value) => {
      if (value.kind === "end") {
        progress = undefined;
        sub.dispose();
      } else {
        progress = {
          title: value.kind === "begin" ? value.title : progress?.title,
          message: value.message ?? progress?.message,
          percentage: value.percentage ?? progress?.percentage,
        };
      }
      updateStatus();
    });
  });
  updateStatus();
}

async function stopClient(): Promise<void> {
  const old = client;
  client = undefined;
  starting = "restarting";
  if (old) {
    try {
      await old.stop(5000);
    } catch (err) {
      output.appendLine(`stop: ${err}`);
    }
  }
}

async function restart(context: vscode.ExtensionContext): Promise<void> {
  await stopClient();
  serverStatus = undefined;
  progress = undefined;
  await startClient(context);
}

/** Run an inline-suggest command and report how many characters it inserted. */
async function partialAccept(builtin: string): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!editor) {
    return vscode.commands.executeCommand(builtin);
  }
  const uri = editor.document.uri.toString();
  let inserted = 0;
  const sub = vscode.workspace.onDidChangeTextDocument((e) => {
    if (e.document.uri.toString() === uri) {
      for (const change of e.contentChanges) {
        inserted += charCount(change.text) - change.rangeLength;
      }
    }
  });
  try {
    await vscode.commands.executeCommand(builtin);
  } finally {
    sub.dispose();
  }
  const report = tracker.onPartial(uri, inserted);
  if (report && client?.isRunning()) {
    void runServerCommand("rotary.suggestionAccepted", [report]).catch(() => undefined);
  }
}

/** Read-only documents with command results (rotary-result:/rotary.stats.json). */
const RESULT_SCHEME = "rotary-result";
const results = new Map<string, string>();
const resultsChanged = new vscode.EventEmitter<vscode.Uri>();

function show(title: string, value: unknown): void {
  const text = JSON.stringify(value ?? null, null, 2);
  output.info(`${title}: ${text}`);
  const uri = vscode.Uri.from({ scheme: RESULT_SCHEME, path: `/${title}.json` });
  results.set(uri.toString(), text);
  resultsChanged.fire(uri);
  void vscode.workspace
    .openTextDocument(uri)
    .then((d) => vscode.languages.setTextDocumentLanguage(d, "json"))
    .then((d) => {
      // Reuse the column where the result is already shown.
      const open = vscode.window.visibleTextEditors.find((e) => e.document.uri.toString() === uri.toString());
      return vscode.window.showTextDocument(d, { preview: true, viewColumn: open?.viewColumn ?? vscode.ViewColumn.Beside });
    });
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel("Rotary", { log: true });
  statusItem = vscode.window.createStatusBarItem("rotary.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "Rotary";
  context.subscriptions.push(
    output,
    statusItem,
    resultsChanged,
    vscode.workspace.registerTextDocumentContentProvider(RESULT_SCHEME, {
      onDidChange: resultsChanged.event,
      provideTextDocumentContent: (uri) => results.get(uri.toString()) ?? "",
    }),
  );
  updateStatus();

  const register = (id: string, fn: (...args: any[]) => unknown) =>
    context.subscriptions.push(vscode.commands.registerCommand(id, fn));

  // Net characters of the latest change per document: the accept command runs right
  // after VS Code applied the item, so this is what the accept inserted.
  const lastInserted = new Map<string, number>();
  context.subscriptions.push(
    vscode.workspace.onDidChangeTextDocument((e) => {
      if (e.contentChanges.length > 0) {
        const n = e.contentChanges.reduce((sum, c) => sum + charCount(c.text) - c.rangeLength, 0);
        lastInserted.set(e.document.uri.toString(), n);
      }
    }),
    vscode.workspace.onDidCloseTextDocument((d) => lastInserted.delete(d.uri.toString())),
  );
  register(ACCEPTED, (uri: string, args: AcceptedArgs) => {
    const report = tracker.onFull(uri, args, lastInserted.get(uri));
    return runServerCommand("rotary.suggestionAccepted", [report]).catch((err) => output.appendLine(`accept report: ${err}`));
  });
  register("rotary.client.toggle", async () => {
    if (serverCommands().includes("rotary.toggle")) {
      const result = (await runServerCommand("rotary.toggle")) as { enabled?: boolean } | null;
      vscode.window.setStatusBarMessage(`Rotary completions ${result?.enabled ? "on" : "off"}`, 3000);
    } else {
      await config().update("enabled", !config().get("enabled", true), vscode.ConfigurationTarget.Global);
    }
  });
  register("rotary.client.showStats", async () => show("rotary.stats", await runServerCommand("rotary.stats")));
  register("rotary.client.restartServer", () => restart(context));
  register("rotary.client.showLog", () => output.show(true));
  register("rotary.client.acceptNextWord", () => partialAccept("editor.action.inlineSuggest.acceptNextWord"));
  register("rotary.client.acceptNextLine", () => partialAccept("editor.action.inlineSuggest.acceptNextLine"));
  register("rotary.client.runServerCommand", async () => {
    const picks = commandPicks(serverCommands());
    const pick = await vscode.window.showQuickPick(picks, { title: "Rotary: Run Server Command", matchOnDescription: true });
    if (!pick) {
      return;
    }
    if (pick.clientCommand) {
      return vscode.commands.executeCommand(pick.clientCommand);
    }
    let args: unknown[] | undefined;
    const raw = await vscode.window.showInputBox({
      title: pick.serverCommand,
      prompt: "Arguments as a JSON array (empty for none)",
      value: "",
    });
    if (raw === undefined) {
      return;
    }
    if (raw.trim() !== "") {
      try {
        args = JSON.parse(raw);
      } catch (err) {
        void vscode.window.showErrorMessage(`Rotary: arguments are not JSON: ${err}`);
        return;
      }
    }
    try {
      show(pick.serverCommand!, await runServerCommand(pick.serverCommand!, Array.isArray(args) ? args : args === undefined ? undefined : [args]));
    } catch (err) {
      void vscode.window.showErrorMessage(`Rotary ${pick.serverCommand}: ${err}`);
    }
  });

  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration(async (e) => {
      if (!e.affectsConfiguration(SECTION)) {
        return;
      }
      if (["serverPath", "languages", "trace.server"].some((k) => e.affectsConfiguration(`${SECTION}.${k}`))) {
        await restart(context);
        return;
      }
      const settings = currentServerSettings();
      if (client?.isRunning() && !sameSettings(settings, lastSent)) {
        lastSent = settings;
        await client.sendNotification("workspace/didChangeConfiguration", { settings: { [SECTION]: settings } });
      }
    }),
  );

  await startClient(context);
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
