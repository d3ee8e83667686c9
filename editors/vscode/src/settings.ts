// The server's typed settings (section "rotary") and where the server executable is.
// No `vscode` import: unit-tested under plain node.
import * as path from "path";

/** Keys and defaults of the server's settings tree (lsp/settings.py); package.json declares the same. */
export const SERVER_SETTING_DEFAULTS = {
  enabled: true,
  workerAddress: "",
  model: "",
  maxTokens: 64,
  completionMode: "auto",
  debounceMs: 50,
  editAwareCache: true,
  abstainThreshold: -1.0,
  decodingMode: "lossless",
  exitThreshold: -1.0,
} as const;

export type ServerSettingKey = keyof typeof SERVER_SETTING_DEFAULTS;
export type ServerSettings = { [K in ServerSettingKey]: (typeof SERVER_SETTING_DEFAULTS)[K] extends boolean
  ? boolean : (typeof SERVER_SETTING_DEFAULTS)[K] extends number ? number : string };

/** Settings only the extension reads: changing one restarts the server. */
export const CLIENT_ONLY_KEYS = ["serverPath", "languages", "trace.server"] as const;

/** A reader of the "rotary" configuration section (vscode.WorkspaceConfiguration.get). */
export type ConfigReader = <T>(key: string, fallback: T) => T;

/**
 * Settings that send the user's text somewhere (workerAddress) or load code (model): read
 * only from the user's own settings, never from a workspace's .vscode/settings.json, which
 * any cloned repository can bring. package.json declares them with machine scope as well.
 */
export const USER_ONLY_KEYS: readonly ServerSettingKey[] = ["workerAddress", "model"];

/** The fields of vscode.WorkspaceConfiguration.inspect() read here. */
export interface InspectedSetting<T> {
  globalValue?: T;
  workspaceValue?: T;
  workspaceFolderValue?: T;
  workspaceLanguageValue?: T;
  workspaceFolderLanguageValue?: T;
}
export type ConfigInspector = <T>(key: string) => InspectedSetting<T> | undefined;

/**
 * A reader that takes USER_ONLY_KEYS from the user's settings alone (the default when
 * unset there) and reports each workspace value it ignores to `ignored`; other keys are
 * read as `get` reads them.
 */
export function userScopedReader(get: ConfigReader, inspect: ConfigInspector, ignored: (key: string) => void): ConfigReader {
  return <T>(key: string, fallback: T): T => {
    if (!(USER_ONLY_KEYS as readonly string[]).includes(key)) {
      return get(key, fallback);
    }
    const seen = inspect<T>(key);
    if (seen && [seen.workspaceValue, seen.workspaceFolderValue, seen.workspaceLanguageValue, seen.workspaceFolderLanguageValue]
      .some((v) => v !== undefined)) {
      ignored(key);
    }
    return seen?.globalValue ?? fallback;
  };
}

/** The object sent as initializationOptions and in didChangeConfiguration's {settings: {rotary}}. */
export function serverSettings(get: ConfigReader): ServerSettings {
  const out: Record<string, unknown> = {};
  for (const [key, fallback] of Object.entries(SERVER_SETTING_DEFAULTS)) {
    out[key] = get(key, fallback);
  }
  return out as ServerSettings;
}

export function sameSettings(a: object | undefined, b: object | undefined): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export interface ServerPathContext {
  /** $PATH */
  pathEnv: string;
  /** fs paths of the workspace folders */
  workspaceFolders: string[];
  /** the extension's folder; in a checkout (editors/vscode) the repo's .venv is two levels up */
  extensionPath: string;
  home: string;
  isExecutable(file: string): boolean;
  platform?: NodeJS.Platform;
}

/**
 * The `rotary` executable to start: the rotary.serverPath setting when set, else
 * `rotary` on PATH, else `.venv/bin/rotary` in a workspace folder or in the checkout
 * the extension runs from (the README's set-up creates that venv).
 */
export function resolveServerPath(setting: string, ctx: ServerPathContext): string | undefined {
  const win = (ctx.platform ?? process.platform) === "win32";
  const exe = win ? "rotary.exe" : "rotary";
  const venvBin = win ? path.join(".venv", "Scripts", exe) : path.join(".venv", "bin", exe);
  const expand = (p: string) => {
    let out = p.trim();
    if (out === "~" || out.startsWith("~/")) {
      out = path.join(ctx.home, out.slice(1));
    }
    if (out.includes("${workspaceFolder}") && ctx.workspaceFolders.length > 0) {
      out = out.split("${workspaceFolder}").join(ctx.workspaceFolders[0]);
    }
    return out;
  };
  if (setting.trim() !== "") {
    const p = expand(setting);
    if (!p.includes(path.sep) && !p.includes("/")) {
      return searchPath(p, ctx) ?? p; // a bare name: look it up, else let spawn report it
    }
    return p;
  }
  const onPath = searchPath(exe, ctx);
  if (onPath) {
    return onPath;
  }
  const roots = [...ctx.workspaceFolders, path.resolve(ctx.extensionPath, "..", "..")];
  for (const root of roots) {
    const candidate = path.join(root, venvBin);
    if (ctx.isExecutable(candidate)) {
      return candidate;
    }
  }
  return undefined;
}

function searchPath(name: string, ctx: ServerPathContext): string | undefined {
  const sep = (ctx.platform ?? process.platform) === "win32" ? ";" : ":";
  for (const dir of ctx.pathEnv.split(sep)) {
    if (!dir) {
      continue;
    }
    const candidate = path.join(dir, name);
    if (ctx.isExecutable(candidate)) {
      return candidate;
    }
  }
  return undefined;
}

/** The document selector for the configured languages (files and unsaved editors). */
export function documentSelector(languages: string[]): { scheme: string; language: string }[] {
  const out: { scheme: string; language: string }[] = [];
  for (const language of languages) {
    for (const scheme of ["file", "untitled"]) {
      out.push({ scheme, language });
    }
  }
  return out;
}
