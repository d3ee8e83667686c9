// Drives code-server in Debian's Chromium (playwright-core); started by e2e.sh, which
// owns installation, the code-server process and clean-up. Exit code 0 = passed.
//
//   node e2e-driver.mjs --url URL --project DIR --file main.py --orig main.py.orig \
//     --artifacts DIR --driver .../playwright-core/index.mjs [--timeout-s 180]
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const { chromium } = await import(args.driver);
const timeoutMs = Number(args["timeout-s"] ?? 180) * 1000;
const artifacts = args.artifacts;
const typed = "    return";
const log = (msg) => console.error(`[driver] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let step = 0;

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
  const file = join(artifacts, `${String(step).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  log(`screenshot ${file}`);
};
const fail = async (msg) => {
  log(`FAIL: ${msg}`);
  await shot("failure").catch(() => undefined);
  await browser.close();
  process.exit(1);
};

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
    return { any, inline, lines: zoneLines };
  });

async function openFile(name) {
  await page.keyboard.press("Control+P");
  await page.waitForSelector(".quick-input-widget input", { timeout: 30_000 });
  await page.keyboard.type(name);
  await sleep(800);
  await page.keyboard.press("Enter");
  await page.waitForSelector(`.tab.active[aria-label*='${name}']`, { timeout: 30_000 });
  await sleep(500);
  await page.click(".editor-group-container.active .monaco-editor .view-lines");
  await page.keyboard.press("Control+End");
}

// Type, then wait for ghost text; the first answer waits for the model to load. While
// loading, the extension re-asks when the server turns ready; Alt+\ asks again meanwhile.
async function typeAndWaitForGhost(text) {
  await page.keyboard.type(text, { delay: 40 });
  const deadline = Date.now() + timeoutMs;
  let ghost = await ghostText();
  let lastTrigger = Date.now();
  while (!(ghost.any && (ghost.inline || ghost.lines.length)) && Date.now() < deadline) {
    await sleep(500);
    if (Date.now() - lastTrigger > 15_000) {
      const status = await page.locator(".statusbar-item:has-text('Rotary')").first().getAttribute("aria-label").catch(() => "");
      log(`no ghost text yet (status: ${status}); Alt+\\ asks again`);
      await page.keyboard.press("Alt+Backslash");
      lastTrigger = Date.now();
    }
    ghost = await ghostText();
  }
  if (!ghost.any) {
    await fail(`no ghost text within ${timeoutMs / 1000}s`);
  }
  return [ghost.inline, ...ghost.lines].join("\n");
}

// Rotary: Show Stats opens the server's rotary.stats as JSON; read the daemon counters.
async function readStats() {
  await page.keyboard.press("F1");
  await page.waitForSelector(".quick-input-widget input", { timeout: 30_000 });
  await page.keyboard.type("Rotary: Show Stats");
  await sleep(800);
  await page.keyboard.press("Enter");
  let text = "";
  for (let i = 0; i < 40 && !/"accepted_chars"/.test(text); i++) {
    await sleep(500);
    text = await page.evaluate(() =>
      [...document.querySelectorAll(".monaco-editor .view-lines")].map((el) => el.textContent ?? "").join("\n").replace(/\u00a0/g, " "),
    );
  }
  const num = (key) => Number((new RegExp(`"${key}":\\s*(\\d+)`).exec(text) ?? [])[1]);
  return { shown: num("shown"), accepted: num("accepted"), partial: num("accepted_partial"), chars: num("accepted_chars"), text };
}

const saveAndRead = async (name) => {
  await page.keyboard.press("Control+S");
  await sleep(1500);
  return readFileSync(join(args.project, name), "utf8");
};

try {
  log(`open ${args.url}`);
  await page.goto(args.url, { waitUntil: "domcontentloaded", timeout: 120_000 });
  await page.waitForSelector(".monaco-workbench", { timeout: 120_000 });
  await page.waitForSelector(".statusbar-item:has-text('Rotary')", { timeout: 120_000 }).catch(() => fail("no Rotary status bar item: the extension did not activate"));
  await shot("workbench");
  const before = readFileSync(args.orig, "utf8");

  // 1. Ghost text appears; Tab inserts exactly it; the server counts it.
  await openFile(args.file);
  const shown = await typeAndWaitForGhost(typed);
  log(`ghost text: ${JSON.stringify(shown)}`);
  await shot("ghost-text");
  await page.keyboard.press("Tab");
  await sleep(500);
  const after = await ghostText();
  const text = await saveAndRead(args.file);
  await shot("accepted");
  writeFileSync(join(artifacts, "after-accept.txt"), text);
  if (text === before + typed) {
    await fail("Tab inserted nothing");
  }
  if (text.trimEnd() !== (before + typed + shown).trimEnd()) {
    await fail(`the file after Tab is not the typed text plus the ghost text:\n--- got\n${text}\n--- want\n${before + typed + shown}`);
  }
  if (after.any && after.inline === shown) {
    await fail("the ghost text is still shown after Tab");
  }
  log("accepted text matches the ghost text");
  const stats1 = await readStats();
  await shot("stats");
  log(`stats: shown=${stats1.shown} accepted=${stats1.accepted} partial=${stats1.partial} chars=${stats1.chars}`);
  if (!(stats1.accepted === 1 && stats1.shown >= 1 && stats1.chars === [...shown].length)) {
    await fail(`the server did not count the accepted suggestion (stats: ${stats1.text.slice(0, 600)})`);
  }

  // 2. Accept next word (Rotary's Ctrl+Right wraps VS Code's command and reports it),
  //    then Tab for the rest: the server counts one partial and one full accept, and
  //    the accepted characters add up to the suggestion once.
  await openFile(args.file2);
  const shown2 = await typeAndWaitForGhost(typed);
  log(`ghost text: ${JSON.stringify(shown2)}`);
  await page.keyboard.press("Control+ArrowRight");
  await sleep(800);
  await shot("accepted-word");
  const partialText = await saveAndRead(args.file2);
  const word = partialText.slice((before + typed).length);
  log(`accept next word inserted ${JSON.stringify(word)}`);
  if (!(word.length > 0 && shown2.startsWith(word) && word.length < shown2.length + 1)) {
    await fail(`Ctrl+Right did not insert the next word of ${JSON.stringify(shown2)} (got ${JSON.stringify(word)})`);
  }
  let tookRest = false;
  if (word !== shown2) {
    // The rest of the suggestion is still shown; Tab takes it.
    const rest = await ghostText();
    if (rest.any && (rest.inline || rest.lines.length)) {
      await page.keyboard.press("Tab");
      await sleep(500);
      tookRest = true;
      const fullText = await saveAndRead(args.file2);
      if (fullText.trimEnd() !== (before + typed + shown2).trimEnd()) {
        await fail(`word then Tab did not give the whole suggestion:\n--- got\n${fullText}\n--- want\n${before + typed + shown2}`);
      }
    }
  }
  const stats2 = await readStats();
  await shot("stats-partial");
  log(`stats: shown=${stats2.shown} accepted=${stats2.accepted} partial=${stats2.partial} chars=${stats2.chars}`);
  if (!(stats2.partial >= 1)) {
    await fail(`the partial accept was not reported (stats: ${stats2.text.slice(0, 600)})`);
  }
  if (tookRest && stats2.chars - stats1.chars !== [...shown2].length) {
    await fail(`word + rest should count ${[...shown2].length} accepted characters, the server counted ${stats2.chars - stats1.chars}`);
  }
  await browser.close();
  log("PASS");
} catch (err) {
  await fail(String(err?.stack ?? err));
}
