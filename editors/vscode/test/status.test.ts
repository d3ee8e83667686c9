import assert from "node:assert/strict";
import { test } from "node:test";
import { statusView } from "../src/status";

const ready = { state: "ready", message: "ready: SmolLM2-135M on cpu", latencyMs: 231.6, lastResult: "suggestion" as const };

test("starting and loading spin", () => {
  assert.match(statusView(undefined, undefined, "starting the server").text, /sync~spin/);
  assert.match(statusView({ ...ready, state: "loading", latencyMs: null, lastResult: null }, undefined, undefined).tooltip, /loading/);
});

test("progress shows its percentage", () => {
  const view = statusView(undefined, { title: "Rotary", message: "loading weights", percentage: 40 }, undefined);
  assert.equal(view.text, "$(sync~spin) Rotary 40%");
  assert.match(view.tooltip, /loading weights 40%/);
});

test("ready shows the last latency", () => {
  const view = statusView(ready, undefined, undefined);
  assert.equal(view.text, "$(check) Rotary 232 ms");
  assert.equal(view.error, false);
});

test("an empty answer shows 'no suggestion'", () => {
  assert.equal(statusView({ ...ready, lastResult: "empty" }, undefined, undefined).text, "$(circle-outline) Rotary: no suggestion");
});

test("error is marked so a click opens the log", () => {
  const view = statusView({ state: "error", message: "worker died", latencyMs: null, lastResult: null }, undefined, undefined);
  assert.equal(view.error, true);
  assert.match(view.tooltip, /worker died/);
});

test("disabled", () => {
  assert.equal(statusView({ ...ready, state: "disabled" }, undefined, undefined).text, "$(circle-slash) Rotary");
});
