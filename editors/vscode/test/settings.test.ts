import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";
import {
  CLIENT_ONLY_KEYS, documentSelector, resolveServerPath, SERVER_SETTING_DEFAULTS, serverSettings, USER_ONLY_KEYS, userScopedReader,
} from "../src/settings";

// Compiled to out-test/test/: package.json is three levels up.
const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "..", "package.json"), "utf8"));
const declared: Record<string, { type: string; default: unknown }> = pkg.contributes.configuration.properties;

test("package.json declares every server setting with the server's name, type and default", () => {
  for (const [key, value] of Object.entries(SERVER_SETTING_DEFAULTS)) {
    const decl = declared[`rotary.${key}`];
    assert.ok(decl, `rotary.${key} is not declared`);
    assert.deepEqual(decl.default, value, `default of rotary.${key}`);
    // JSON has one number type: a declared "number" or "integer" both hold a numeric default.
    const type = typeof value === "boolean" ? "boolean" : typeof value === "number" ? ["integer", "number"] : ["string"];
    assert.ok(([] as string[]).concat(type).includes(decl.type), `type of rotary.${key}: ${decl.type}`);
  }
});

test("package.json declares nothing else but the client-only settings", () => {
  const server = Object.keys(SERVER_SETTING_DEFAULTS).map((k) => `rotary.${k}`);
  const client = CLIENT_ONLY_KEYS.map((k) => `rotary.${k}`);
  assert.deepEqual(Object.keys(declared).sort(), [...server, ...client].sort());
});

test("completionMode offers exactly the server's modes", () => {
  assert.deepEqual(declared["rotary.completionMode"] && (declared["rotary.completionMode"] as any).enum, ["auto", "singleLine", "multiLine"]);
});

test("serverSettings reads only server keys, with defaults for unset ones", () => {
  const store: Record<string, unknown> = { maxTokens: 16, serverPath: "/x", languages: ["python"] };
  const read = <T>(key: string, fallback: T): T => (key in store ? (store[key] as T) : fallback);
  assert.deepEqual(serverSettings(read), { ...SERVER_SETTING_DEFAULTS, maxTokens: 16 });
});

function ctx(executables: string[], extra: Partial<Parameters<typeof resolveServerPath>[1]> = {}) {
  return {
    pathEnv: "/usr/local/bin:/usr/bin",
    workspaceFolders: ["/work/project"],
    extensionPath: "/repo/editors/vscode",
    home: "/home/me",
    isExecutable: (f: string) => executables.includes(f),
    platform: "linux" as NodeJS.Platform,
    ...extra,
  };
}

test("serverPath setting wins, with ~ and ${workspaceFolder} expanded", () => {
  assert.equal(resolveServerPath("/opt/rotary/bin/rotary", ctx(["/usr/bin/rotary"])), "/opt/rotary/bin/rotary");
  assert.equal(resolveServerPath("~/venv/bin/rotary", ctx([])), "/home/me/venv/bin/rotary");
  assert.equal(resolveServerPath("${workspaceFolder}/.venv/bin/rotary", ctx([])), "/work/project/.venv/bin/rotary");
});

test("a bare serverPath name is looked up on PATH", () => {
  assert.equal(resolveServerPath("rotary", ctx(["/usr/bin/rotary"])), "/usr/bin/rotary");
});

test("default: rotary on PATH, then a workspace .venv, then the checkout's .venv", () => {
  assert.equal(resolveServerPath("", ctx(["/usr/bin/rotary", "/work/project/.venv/bin/rotary"])), "/usr/bin/rotary");
  assert.equal(resolveServerPath("", ctx(["/work/project/.venv/bin/rotary", "/repo/.venv/bin/rotary"])), "/work/project/.venv/bin/rotary");
  assert.equal(resolveServerPath("", ctx(["/repo/.venv/bin/rotary"])), "/repo/.venv/bin/rotary");
  assert.equal(resolveServerPath("", ctx([])), undefined);
});

test("the document selector covers files and unsaved editors of each language", () => {
  assert.deepEqual(documentSelector(["python"]), [
    { scheme: "file", language: "python" },
    { scheme: "untitled", language: "python" },
  ]);
  assert.deepEqual(documentSelector([]), []);
});

test("workerAddress and model are declared for the user's settings only (machine or application scope)", () => {
  for (const key of USER_ONLY_KEYS) {
    const scope = (declared[`rotary.${key}`] as { scope?: string }).scope;
    assert.ok(scope === "machine" || scope === "application", `rotary.${key} has scope ${scope}`);
  }
  assert.deepEqual([...USER_ONLY_KEYS].sort(), ["model", "workerAddress"]);
});

test("a workspace cannot set workerAddress or model: its values are ignored and reported", () => {
  // What inspect() reports for a repository whose .vscode/settings.json sets them.
  const inspected: Record<string, object> = {
    workerAddress: { workspaceValue: "attacker.example:443" },
    model: { globalValue: "/home/me/models/mine", workspaceFolderValue: "./evil-model" },
    maxTokens: { workspaceValue: 16 },
  };
  const merged: Record<string, unknown> = { workerAddress: "attacker.example:443", model: "./evil-model", maxTokens: 16 };
  const get = <T>(key: string, fallback: T): T => (key in merged ? (merged[key] as T) : fallback);
  const ignored: string[] = [];
  const read = userScopedReader(get, (key) => inspected[key], (key) => ignored.push(key));
  assert.deepEqual(serverSettings(read), {
    ...SERVER_SETTING_DEFAULTS,
    workerAddress: "", // the default: the user has not set it
    model: "/home/me/models/mine", // the user's own value wins over the workspace folder's
    maxTokens: 16, // other settings may come from the workspace
  });
  assert.deepEqual(ignored.sort(), ["model", "workerAddress"]);
});

test("user values of workerAddress and model are used, with nothing reported", () => {
  const inspected: Record<string, object> = { workerAddress: { globalValue: "127.0.0.1:50151" }, model: {} };
  const ignored: string[] = [];
  const read = userScopedReader((_key, fallback) => fallback, (key) => inspected[key], (key) => ignored.push(key));
  assert.equal(serverSettings(read).workerAddress, "127.0.0.1:50151");
  assert.equal(serverSettings(read).model, "");
  assert.deepEqual(ignored, []);
});
