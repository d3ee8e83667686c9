import assert from "node:assert/strict";
import { test } from "node:test";
import { AcceptanceTracker, acceptedArgsOf, charCount } from "../src/acceptance";

test("charCount counts code points like Python's len()", () => {
  assert.equal(charCount("abc"), 3);
  assert.equal(charCount("größe"), 5);
  assert.equal(charCount("a😀"), 2); // two UTF-16 units, one character
});

test("acceptedArgsOf reads the server's accept command only", () => {
  const cmd = { command: "rotary.suggestionAccepted", arguments: [{ id: "x1", acceptedLength: 5, full: true }] };
  assert.deepEqual(acceptedArgsOf(cmd), { id: "x1", acceptedLength: 5, full: true });
  assert.equal(acceptedArgsOf({ command: "other", arguments: [{ id: "x" }] }), undefined);
  assert.equal(acceptedArgsOf(undefined), undefined);
});

test("shown is reported once per suggestion id", () => {
  const t = new AcceptanceTracker();
  assert.deepEqual(t.onShown("file:///a.py", "s1", 10), { id: "s1", length: 10 });
  assert.equal(t.onShown("file:///a.py", "s1", 10), undefined);
  assert.deepEqual(t.onShown("file:///a.py", "s2", 4), { id: "s2", length: 4 });
});

test("the same text at the same place is one suggestion, whatever its new id", () => {
  const t = new AcceptanceTracker();
  assert.deepEqual(t.onShown("u", "s1", 6, "8:10: a * b"), { id: "s1", length: 6 });
  assert.equal(t.onShown("u", "s2", 6, "8:10: a * b"), undefined);
  // ...but the newest id is the one partial accepts are attributed to.
  assert.deepEqual(t.onPartial("u", 1), { id: "s2", acceptedLength: 1, full: false });
  assert.deepEqual(t.onShown("u", "s3", 5, "8:11:a * b"), { id: "s3", length: 5 });
});

test("a full accept reports what the accept inserted", () => {
  const t = new AcceptanceTracker();
  t.onShown("u", "s1", 10);
  assert.deepEqual(t.onFull("u", { id: "s1", acceptedLength: 10, full: true }, 10), { id: "s1", acceptedLength: 10, full: true });
});

test("without a measured edit, the server's own length is kept", () => {
  const t = new AcceptanceTracker();
  assert.deepEqual(t.onFull("u", { id: "s1", acceptedLength: 10, full: true }, undefined), { id: "s1", acceptedLength: 10, full: true });
  assert.deepEqual(t.onFull("u", { id: "s1", acceptedLength: 10, full: true }, 0), { id: "s1", acceptedLength: 10, full: true });
});

test("partial accepts report what they inserted, attributed to the suggestion on screen", () => {
  const t = new AcceptanceTracker();
  t.onShown("u", "s1", 10);
  assert.deepEqual(t.onPartial("u", 3), { id: "s1", acceptedLength: 3, full: false });
  // The editor asked again meanwhile: the newer answer is the one on screen.
  t.onShown("u", "s2", 7);
  assert.deepEqual(t.onPartial("u", 2), { id: "s2", acceptedLength: 2, full: false });
  // Tab takes the rest of the first suggestion: only the inserted rest is counted.
  assert.deepEqual(t.onFull("u", { id: "s1", acceptedLength: 10, full: true }, 5), { id: "s1", acceptedLength: 5, full: true });
  // The suggestion is gone: a later partial accept belongs to nothing we showed.
  assert.equal(t.onPartial("u", 1), undefined);
});

test("partial accepts in another document or of nothing are not reported", () => {
  const t = new AcceptanceTracker();
  t.onShown("u", "s1", 10);
  assert.equal(t.onPartial("other", 3), undefined);
  assert.equal(t.onPartial("u", 0), undefined);
});
