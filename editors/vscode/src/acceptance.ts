// Acceptance reports: which suggestion is shown, and how much of it the user took.
// The server counts them (rotary.suggestionShown / rotary.suggestionAccepted); the
// extension only tells it. No `vscode` import: unit-tested under plain node.

/** The argument object of the server's rotary.suggestionAccepted command. */
export interface AcceptedArgs {
  id: string;
  acceptedLength: number;
  full: boolean;
}

/** Characters as the server counts them (Python's len(): code points). */
export function charCount(text: string): number {
  let n = 0;
  for (const _ of text) {
    n++;
  }
  return n;
}

/** The accept arguments inside an item's command, when it is the server's acceptance command. */
export function acceptedArgsOf(command: { command: string; arguments?: unknown[] } | undefined): AcceptedArgs | undefined {
  if (!command || command.command !== "rotary.suggestionAccepted" || !Array.isArray(command.arguments)) {
    return undefined;
  }
  const first = command.arguments[0] as Partial<AcceptedArgs> | undefined;
  if (!first || typeof first.id !== "string") {
    return undefined;
  }
  return { id: first.id, acceptedLength: Number(first.acceptedLength ?? 0), full: first.full !== false };
}

/**
 * Tracks the suggestion on screen per document, for the reports. The first item of a
 * non-empty answer is the one the editor draws; a partial accept (next word/line) is
 * attributed to it.
 */
export class AcceptanceTracker {
  private shown = new Map<string, string>();
  private shownKey = new Map<string, string>();
  private reported = new Set<string>();

  /**
   * An answer was handed to the editor: returns the report, once per suggestion. VS Code
   * asks again on many occasions (cursor, focus, Alt+\); the same text at the same place
   * (`key`) is the same suggestion on screen, whatever its new id.
   */
  onShown(uri: string, id: string, length: number, key?: string): { id: string; length: number } | undefined {
    this.shown.set(uri, id);
    const sameAsBefore = key !== undefined && this.shownKey.get(uri) === key;
    if (key !== undefined) {
      this.shownKey.set(uri, key);
    }
    if (this.reported.has(id) || sameAsBefore) {
      return undefined;
    }
    this.reported.add(id);
    if (this.reported.size > 1000) {
      this.reported = new Set([...this.reported].slice(-500));
    }
    return { id, length };
  }

  /** A partial accept inserted `inserted` characters into `uri`: the report, if ours. */
  onPartial(uri: string, inserted: number): AcceptedArgs | undefined {
    const id = this.shown.get(uri);
    if (!id || inserted <= 0) {
      return undefined;
    }
    return { id, acceptedLength: inserted, full: false };
  }

  /**
   * The item's own accept command ran, right after the editor applied the item.
   * `inserted` is what that edit added (characters): after partial accepts it is only
   * the rest, so the server's accepted-character count is what was really taken.
   */
  onFull(uri: string, args: AcceptedArgs, inserted: number | undefined): AcceptedArgs {
    this.shown.delete(uri);
    this.shownKey.delete(uri);
    const length = inserted !== undefined && inserted > 0 ? inserted : args.acceptedLength;
    return { id: args.id, acceptedLength: length, full: true };
  }
}
