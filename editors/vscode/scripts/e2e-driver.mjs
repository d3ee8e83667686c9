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

try {
  log(`open ${args.url}`);
  await page.goto(args.url, { waitUntil: "domcontentloaded", timeout: 120_000 });
  await page.waitForSelector(".monaco-workbench", { timeout: 120_000 });
  await page.waitForSelector(".statusbar-item:has-text('Rotary')", { timeout: 120_000 }).catch(() => fail("no Rotary status bar item: the extension did not activate"));
  await shot("workbench");

  // Open the file with Quick Open.
  await page.keyboard.press("Control+P");
  await page.waitForSelector(".quick-input-widget input", { timeout: 30_000 });
  await page.keyboard.type(args.file);
  await sleep(500);
  await page.keyboard.press("Enter");
  await page.waitForSelector(`.tab[aria-label*='${args.file}']`, { timeout: 30_000 });
  await page.click(".editor-instance .monaco-editor .view-lines");
  await page.keyboard.press("Control+End");
  await page.keyboard.type(typed, { delay: 40 });

  // Wait for ghost text; the first answer waits for the model to load. While loading,
  // the extension re-asks when the server turns ready; Alt+\ asks again meanwhile.
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
  const shown = [ghost.inline, ...ghost.lines].join("\n");
  log(`ghost text: ${JSON.stringify(shown)}`);
  await shot("ghost-text");

  // Accept with Tab, save, and check the file on disk.
  await page.keyboard.press("Tab");
  await sleep(500);
  const after = await ghostText();
  await page.keyboard.press("Control+S");
  await sleep(1500);
  await shot("accepted");
  const text = readFileSync(join(args.project, args.file), "utf8");
  const before = readFileSync(args.orig, "utf8");
  const expected = before + typed + shown;
  writeFileSync(join(artifacts, "after-accept.txt"), text);
  if (text === before + typed) {
    await fail("Tab inserted nothing");
  }
  if (text.trimEnd() !== expected.trimEnd()) {
    await fail(`the file after Tab is not the typed text plus the ghost text:\n--- got\n${text}\n--- want\n${expected}`);
  }
  if (after.any && after.inline === ghost.inline) {
    await fail("the ghost text is still shown after Tab");
  }
  log("accepted text matches the ghost text");

  // The server counted the suggestion as shown and accepted: Rotary: Show Stats.
  await page.keyboard.press("F1");
  await page.waitForSelector(".quick-input-widget input", { timeout: 30_000 });
  await page.keyboard.type("Rotary: Show Stats");
  await sleep(800);
  await page.keyboard.press("Enter");
  let stats = "";
  for (let i = 0; i < 40 && !/"accepted"/.test(stats); i++) {
    await sleep(500);
    stats = await page.evaluate(() =>
      [...document.querySelectorAll(".monaco-editor .view-lines")].map((el) => el.textContent ?? "").join("\n").replace(/\u00a0/g, " "),
    );
  }
  await shot("stats");
  const accepted = Number((/"accepted":\s*(\d+)/.exec(stats) ?? [])[1]);
  const shownCount = Number((/"shown":\s*(\d+)/.exec(stats) ?? [])[1]);
  log(`stats: shown=${shownCount} accepted=${accepted}`);
  if (!(accepted >= 1 && shownCount >= 1)) {
    await fail(`the server did not count the accepted suggestion (stats: ${stats.slice(0, 400)})`);
  }
  await browser.close();
  log("PASS");
} catch (err) {
  await fail(String(err?.stack ?? err));
}
