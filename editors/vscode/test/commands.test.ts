import assert from "node:assert/strict";
import { test } from "node:test";
import { commandPicks, humanize } from "../src/commands";

test("humanize turns command ids into titles", () => {
  assert.equal(humanize("rotary.restartWorker"), "Restart Worker");
  assert.equal(humanize("rotary.stats"), "Stats");
  assert.equal(humanize("rotary.generateTests"), "Generate Tests");
});

test("the quick pick lists every server command, whatever the server adds", () => {
  const server = ["rotary.stats", "rotary.toggle", "rotary.suggestionShown", "rotary.generateTests", "rotary.suggestionAccepted"];
  const picks = commandPicks(server);
  const listed = picks.filter((p) => p.serverCommand).map((p) => p.serverCommand);
  assert.deepEqual([...listed].sort(), [...server].sort());
  // Reporting commands (sent by the editor itself) come after the user-facing ones.
  assert.deepEqual(listed.slice(-2), ["rotary.suggestionAccepted", "rotary.suggestionShown"]);
  assert.ok(picks.some((p) => p.clientCommand === "rotary.client.restartServer"));
});

test("no server commands: only the extension's own", () => {
  assert.ok(commandPicks([]).every((p) => p.clientCommand));
});
