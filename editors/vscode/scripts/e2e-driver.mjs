// Drives code-server in Debian's Chromium (playwright-core); started by e2e.sh, which
// owns installation, the code-server process and clean-up. Exit code 0 = every check passed.
//
//   node e2e-driver.mjs --url URL --project DIR --logs DIR --artifacts DIR \
//     --driver .../playwright-core/index.mjs [--scenario basic|indent] [--timeout-s 180]
//
// What the editor shows and inserts is compared with the server's own reply: e2e.sh starts
// code-server with trace logging and sets rotary.trace.server to "verbose", so the
// language client writes every request and response (JSON) to the Rotary log under
// --logs; rotary.stats is read there too (Show Stats logs its result). The buffer is read
// back by saving the file. Every wait is for a condition, never a fixed time.
//
// Scenarios:
//   basic   type, ghost text, Tab (exact file contents), accept word then Tab, the stats
//   indent  Enter after a Python block opener (VS Code's onEnter rules indent the line),
//           Tab, and the line must be the editor's indentation followed by exactly the
//           server's suggestion (issue 7)
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const { chromium } = await import(args.driver);
const timeoutMs = Number(args["timeout-s"] ?? 180) * 1000;
const scenario = args.scenario ?? "basic";
const artifacts = args.artifacts;
const log = (msg) => console.error(`[driver] ${msg}`);
let step = 0;
let failed = 0;
let passed = 0;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
  ],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 850 } });
const shot = async (name) => {
  step += 1;
  const file = join(artifacts, `${String(step).padStart(2, "0")}-${scenario}-${name}.png`);
  await page.screenshot({ path: file });
  log(`screenshot ${file}`);
};
const show = (s) => JSON.stringify(s);

/** One check, TAP-like; the run goes on, and fails at the end. */
function check(name, ok, detail) {
  if (ok) {
    passed += 1;
    log(`ok - ${name}`);
  } else {
    failed += 1;
    log(`not ok - ${name}${detail ? `: ${detail}` : ""}`);
  }
  return ok;
}
/** A check the rest of the run depends on. */
async function require_(name, ok, detail) {
  if (!check(name, ok, detail)) {
    await finish();
  }
}
async function finish() {
  if (failed > 0) {
    await shot("failure").catch(() => undefined);
  }
  await browser.close();
  log(`${passed} passed, ${failed} failed`);
  log(failed === 0 && passed > 0 ? "PASS" : "FAIL");
  process.exit(failed === 0 && passed > 0 ? 0 : 1);
}

/** Poll `fn` (sync or async) every `interval` ms until it returns a truthy value; that value, or undefined. */
async function waitFor(fn, ms, { interval = 100, onIdle } = {}) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      return undefined;
    }
    if (onIdle) {
      await onIdle();
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

// -- The Rotary log: the language client's trace of the LSP traffic, and command results.

function newestRotaryLog() {
  const found = [];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      const st = statSync(path);
      if (st.isDirectory()) {
        walk(path);
      } else if (name === "Rotary.log") {
        found.push({ path, mtime: st.mtimeMs });
      }
    }
  };
  try {
    walk(args.logs);
  } catch {
    return "";
  }
  found.sort((a, b) => b.mtime - a.mtime);
  return found.length ? readFileSync(found[0].path, "utf8") : "";
}

/** Log entries: a line starting with a timestamp and [level] begins one; the lines after it belong to it. */
function logEntries(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(\w+)\] (.*)$/.exec(line);
    if (m) {
      out.push({ level: m[1], first: m[2], body: [] });
    } else if (out.length) {
      out[out.length - 1].body.push(line);
    }
  }
  return out;
}

/** JSON that follows `label` in an entry ("Params: {...}", "Result: {...}"); undefined when absent. */
function jsonAfter(entry, label) {
  const text = [entry.first, ...entry.body].join("\n");
  const at = text.indexOf(label);
  return at < 0 ? undefined : JSON.parse(text.slice(at + label.length));
}

/** Every textDocument/inlineCompletion request with its params and, once answered, its reply. */
function inlineRequests() {
  const requests = new Map();
  for (const e of logEntries(newestRotaryLog())) {
    let m = /^Sending request 'textDocument\/inlineCompletion - \((\d+)\)'/.exec(e.first);
    if (m) {
      requests.set(Number(m[1]), { id: Number(m[1]), params: jsonAfter(e, "Params: "), done: false });
      continue;
    }
    m = /^Received response 'textDocument\/inlineCompletion - \((\d+)\)' in \d+ms\.(.*)$/.exec(e.first);
    const request = m && requests.get(Number(m[1]));
    if (request) {
      request.done = true;
      request.failed = m[2].includes("Request failed");
      const result = request.failed ? null : jsonAfter(e, "Result: ") ?? null;
      request.items = Array.isArray(result) ? result : result?.items ?? [];
    }
  }
  return [...requests.values()].sort((a, b) => a.id - b.id);
}

/** The reply the ghost text comes from: all requests answered, the newest one with items, for a position `at` accepts. */
function settledReply(at) {
  const requests = inlineRequests();
  if (requests.length === 0 || requests.some((r) => !r.done)) {
    return undefined;
  }
  const answered = requests.filter((r) => !r.failed && r.items.length > 0);
  const newest = answered[answered.length - 1];
  return newest && at(newest.params.position) ? newest : undefined;
}
/** Run "Rotary: Show Stats" and return the server's rotary.stats (logged by the extension). */
async function readStats() {
  const before = logEntries(newestRotaryLog()).filter((e) => e.first.startsWith("rotary.stats: ")).length;
  await runCommand("Rotary: Show Stats");
  const entry = await waitFor(() => {
    const all = logEntries(newestRotaryLog()).filter((e) => e.first.startsWith("rotary.stats: "));
    return all.length > before ? all[all.length - 1] : undefined;
  }, 30_000);
  if (!entry) {
    return undefined;
  }
  // The result opens beside and takes the focus; wait for it, so later keys go where meant.
  await page.waitForSelector(".tab.active[aria-label*='rotary.stats']", { timeout: 30_000 });
  await page.waitForSelector(".editor-group-container.active .monaco-editor.focused", { timeout: 30_000 });
  return jsonAfter(entry, "rotary.stats: ");
}

// -- The page.

// Reads the ghost text as VS Code draws it: inline part(s) on the cursor line, then
// the extra lines of a multi-line suggestion (a view zone).
const ghostText = () =>
  page.evaluate(() => {
    const norm = (s) => s.replace(/\u00a0/g, " ");
    const inline = [...document.querySelectorAll(".monaco-editor .view-lines [class*=ghost-text]")]
      .map((el) => norm(el.textContent ?? ""))
      .join("");
    const zoneLines = [...document.querySelectorAll(".monaco-editor .ghost-text .view-line, .monaco-editor div.ghost-text-view-zone .view-line")]
      .map((el) => norm(el.textContent ?? ""));
    const any = document.querySelector(".monaco-editor [class*=ghost-text]") !== null;
    return { any, text: [inline, ...zoneLines].join("\n") };
  });

async function quickInput(trigger, text, rowLabel) {
  await page.keyboard.press(trigger);
  await page.waitForSelector(".quick-input-widget input:focus", { timeout: 30_000 });
  await page.keyboard.type(text);
  // Enter only once the row we want is the focused one.
  await page.waitForSelector(`.quick-input-list .monaco-list-row.focused[aria-label*=${JSON.stringify(rowLabel)}]`, { timeout: 30_000 });
  await page.keyboard.press("Enter");
}

async function runCommand(title) {
  await quickInput("F1", title, title);
}

async function openFile(name) {
  await quickInput("Control+P", name, name);
  await page.waitForSelector(`.tab.active[aria-label*='${name}']`, { timeout: 30_000 });
  const editor = ".editor-group-container.active .monaco-editor .view-lines";
  await page.waitForSelector(editor, { timeout: 30_000 });
  await page.click(editor);
  await page.waitForSelector(".editor-group-container.active .monaco-editor.focused", { timeout: 30_000 });
  await page.keyboard.press("Control+End");
}

/**
 * Save the active editor after an edit and return the file. Waits for VS Code to mark the
 * tab dirty (the edit registered; it never does when the edit did not happen, and then the
 * file is returned as it is), then for the save to finish (the mark is gone).
 */
async function saveAndRead(name, ms = 10_000) {
  const tab = `.tab.active[aria-label*='${name}']`;
  const edited = await page.waitForSelector(`${tab}.dirty`, { timeout: ms }).then(() => true, () => false);
  if (edited) {
    await page.keyboard.press("Control+S");
    await page.waitForSelector(`${tab}:not(.dirty)`, { timeout: 30_000 });
  }
  return readFileSync(join(args.project, name), "utf8");
}

/**
 * Wait for ghost text and the server's reply it comes from, for a cursor position `at`
 * accepts ({line, character}). The first answer waits for the model to load: the extension
 * asks again when the server turns ready, and Alt+\ asks meanwhile. Returns
 * { ghost, item, params } or undefined.
 */
async function ghostAndReply(ms, at) {
  let lastTrigger = Date.now();
  return waitFor(async () => {
    const ghost = await ghostText();
    const reply = ghost.any ? settledReply(at) : undefined;
    return reply ? { ghost: ghost.text, item: reply.items[0], params: reply.params } : undefined;
  }, ms, {
    interval: 200,
    onIdle: async () => {
      if (Date.now() - lastTrigger > 15_000) {
        log("no ghost text yet; Alt+\\ asks again");
        await page.keyboard.press("Alt+Backslash");
        lastTrigger = Date.now();
      }
    },
  });
}

const insertTextOf = (item) => (typeof item.insertText === "string" ? item.insertText : item.insertText.value);

/**
 * What accepting `item` inserts at the cursor, given the line's text before the cursor
 * (the item's range may start before the cursor on the same line); undefined when the item
 * does not apply there.
 */
function insertedAtCursor(item, params, lineBefore) {
  const text = insertTextOf(item);
  const range = item.range ?? { start: params.position, end: params.position };
  if (range.start.line !== params.position.line || range.end.line !== params.position.line
      || range.end.character !== params.position.character) {
    return undefined;
  }
  const typed = lineBefore.slice(range.start.character);
  return text.startsWith(typed) ? text.slice(typed.length) : undefined;
}

const chars = (s) => [...s].length;
const firstDifference = (a, b) => {
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) return i;
  }
  return -1;
};

// -- Scenarios.

async function basic() {
  const typed = "    return";
  const before = readFileSync(join(args.project, "main.py"), "utf8");
  const lineBefore = typed;

  // 1. Ghost text appears; it is the server's reply; Tab inserts exactly it; the server counts it.
  await openFile("main.py");
  await page.keyboard.type(typed, { delay: 40 });
  const atTyped = (p) => p.line === 8 && p.character === typed.length;
  const first = await ghostAndReply(timeoutMs, atTyped);
  await require_("after typing, ghost text appears with the server's reply for the cursor", first !== undefined);
  await shot("ghost-text");
  const suggestion = insertedAtCursor(first.item, first.params, lineBefore);
  log(`server's suggestion: ${show(insertTextOf(first.item))}`);
  await require_("the item applies at the cursor", suggestion !== undefined, show(first.item));
  check("the ghost text is the server's suggestion", first.ghost === suggestion, `shown ${show(first.ghost)}, server ${show(suggestion)}`);
  await page.keyboard.press("Tab");
  const text = await saveAndRead("main.py");
  await shot("accepted");
  writeFileSync(join(artifacts, "after-accept.txt"), text);
  const want = before + typed + suggestion;
  check("Tab inserts exactly the server's suggestion (the whole file, byte for byte)", text === want,
    `got ${show(text)}, want ${show(want)} (first difference at ${firstDifference(text, want)})`);
  const stats1 = await readStats();
  await shot("stats");
  const d1 = stats1?.daemon;
  await require_("rotary.stats answers with the daemon's counters", d1 !== undefined);
  check("the server counted one full accept of the suggestion's characters",
    d1.accepted === 1 && d1.accepted_chars === chars(suggestion) && d1.shown >= 1,
    show({ accepted: d1.accepted, accepted_chars: d1.accepted_chars, shown: d1.shown }));
  // e2e.sh's project sets rotary.workerAddress and rotary.model in .vscode/settings.json.
  // VS Code drops workspace values of these machine-scoped settings; were they declared
  // otherwise, the extension's own reader (settings.ts, userScopedReader) drops them and warns.
  check("the workspace's workerAddress and model did not reach the server",
    d1.settings?.workerAddress === "" && d1.settings?.model === "", show(d1.settings));

  // 2. Accept next word (Rotary's Ctrl+Right wraps VS Code's command and reports it),
  //    then Tab for the rest: the file is the server's suggestion, and the server counts
  //    one partial and one full accept whose characters add up to it.
  await openFile("other.py");
  await page.keyboard.type(typed, { delay: 40 });
  const second = await ghostAndReply(60_000, atTyped);
  await require_("ghost text for accept word", second !== undefined);
  const full = insertedAtCursor(second.item, second.params, lineBefore);
  check("it is the server's suggestion", second.ghost === full, `shown ${show(second.ghost)}, server ${show(full)}`);
  await page.keyboard.press("Control+ArrowRight");
  const partialText = await saveAndRead("other.py");
  await shot("accepted-word");
  const word = partialText.slice((before + typed).length);
  log(`accept next word inserted ${show(word)}`);
  check("Ctrl+Right inserts a non-empty part of the suggestion, not all of it",
    partialText.startsWith(before + typed) && word.length > 0 && word.length < full.length && full.startsWith(word),
    `inserted ${show(word)} of ${show(full)}`);
  // VS Code asks again at the new position and shows that reply.
  const rest = await ghostAndReply(60_000, (p) => p.line === 8 && p.character === typed.length + word.length);
  await require_("after the word, ghost text with the server's reply for the new position", rest !== undefined);
  const restWant = insertedAtCursor(rest.item, rest.params, lineBefore + word);
  check("the ghost text is the rest the server suggests", rest.ghost === restWant,
    `shown ${show(rest.ghost)}, server ${show(restWant)}`);
  await page.keyboard.press("Tab");
  const fullText = await saveAndRead("other.py");
  const want2 = before + typed + word + restWant;
  check("word then Tab gives exactly the server's suggestion", fullText === want2,
    `got ${show(fullText)}, want ${show(want2)} (first difference at ${firstDifference(fullText, want2)})`);
  const stats2 = await readStats();
  await shot("stats-partial");
  const d2 = stats2?.daemon;
  await require_("rotary.stats answers again", d2 !== undefined);
  check("the server counted the partial accept", d2.accepted_partial - d1.accepted_partial === 1,
    show({ accepted_partial: d2.accepted_partial }));
  check("and the full accept of the rest", d2.accepted - d1.accepted === 1, show({ accepted: d2.accepted }));
  check("with the characters inserted", d2.accepted_chars - d1.accepted_chars === chars(word + restWant),
    `counted ${d2.accepted_chars - d1.accepted_chars}, inserted ${chars(word + restWant)}`);
}

async function indent() {
  // Enter after a block opener: VS Code's Python onEnter rule indents the new line. The
  // line after Tab must be that indentation followed by exactly the server's suggestion.
  // Each file starts as "import math\n\n\n" (e2e.sh writes it); the cursor goes to its end.
  const cases = [
    { name: "def + Enter", file: "indent_def.py", lines: ["def add(a, b):"], indent: "    " },
    { name: "with + Enter", file: "indent_with.py", lines: ["def read_lines(path):", "with open(path) as f:"], indent: "        " },
  ];
  let wait = timeoutMs;
  for (const c of cases) {
    const original = readFileSync(join(args.project, c.file), "utf8");
    await openFile(c.file);
    for (const line of c.lines) {
      await page.keyboard.type(line, { delay: 30 });
      await page.keyboard.press("Enter");
    }
    const row = original.split("\n").length - 1 + c.lines.length;
    const got = await ghostAndReply(wait, (p) => p.line === row);
    wait = 60_000;
    if (!check(`${c.name}: ghost text appears with the server's reply for the new line`, got !== undefined)) {
      continue;
    }
    await shot(`${c.file}-ghost`);
    const { position } = got.params;
    log(`${c.name}: server's suggestion ${show(insertTextOf(got.item))} at ${show(position)}`);
    // What the editor put before the cursor, read back from the file before accepting.
    const typedText = await saveAndRead(c.file);
    const lines = typedText.split("\n");
    const lineBefore = lines[row] ?? "";
    check(`${c.name}: the editor indents the new line by ${c.indent.length} (Python's onEnter rule)`,
      lineBefore === c.indent && lines.length === row + 1 && position.character === c.indent.length,
      `line ${show(lineBefore)} at ${show(position)}`);
    const suggestion = insertedAtCursor(got.item, got.params, lineBefore);
    if (!check(`${c.name}: the item applies at the cursor`, suggestion !== undefined, show(got.item))) {
      continue;
    }
    check(`${c.name}: the ghost text is the server's suggestion`, got.ghost === suggestion,
      `shown ${show(got.ghost)}, server ${show(suggestion)}`);
    await page.keyboard.press("Tab");
    const text = await saveAndRead(c.file);
    await shot(`${c.file}-accepted`);
    const line = text.split("\n")[row] ?? "";
    const want = lineBefore + suggestion.split("\n")[0];
    check(`${c.name}: the accepted line is the editor's indentation followed by the server's suggestion`,
      line === want, `line ${show(line)}, want ${show(want)} (first difference at column ${firstDifference(line, want)})`);
    const indentation = /^[ \t]*/.exec(line)[0];
    check(`${c.name}: the accepted line keeps the editor's indentation (${c.indent.length} columns)`,
      indentation === lineBefore,
      `line ${show(line)} has ${indentation.length} columns of indentation, the editor put ${lineBefore.length}: the suggestion ${show(suggestion)} repeats it`);
    check(`${c.name}: the suggestion starts with code at the cursor (no whitespace, no newline)`,
      /^\S/.test(suggestion), show(suggestion));
    check(`${c.name}: the file is the typed text followed by the suggestion`, text === typedText + suggestion,
      `got ${show(text)}, want ${show(typedText + suggestion)}`);
  }
}

try {
  log(`open ${args.url}`);
  await page.goto(args.url, { waitUntil: "domcontentloaded", timeout: 120_000 });
  await page.waitForSelector(".monaco-workbench", { timeout: 120_000 });
  const status = await page.waitForSelector(".statusbar-item:has-text('Rotary')", { timeout: 120_000 }).catch(() => null);
  await require_("the extension activated (Rotary status bar item)", status !== null);
  await shot("workbench");
  if (scenario === "indent") {
    await indent();
  } else {
    await basic();
  }
} catch (err) {
  check("the driver ran to the end", false, String(err?.stack ?? err));
}
await finish();
