// The llama.cpp peer of `rotary bench decode` (bench/peer.py runs it): node-llama-cpp's prebuilt
// CPU binary (@node-llama-cpp/linux-x64) on the GGUF Rotary loads, fed the token ids Rotary's own
// tokenizer made (so both see the same tokens), never built from source nor downloaded.
//
// stdin, one JSON job:
//   {"gguf": PATH, "threads": T, "prefill_threads": P, "steps": N,
//    "contexts": {"1024": [[ids...], ...], "4096": [[ids...], ...]},
//    "edits": [{"before": [ids...], "after": [ids...]}, ...],   (optional: one line changed in a ~4k file)
//    "tokenize_check": {"text": "...", "ids": [...]}}             (optional: does llama.cpp's own tokenizer agree?)
// stdout, one JSON object: "build", and per context length "decode" (ms/token median over the greedy
// steps after a prefill, per thread count), "prefill_tok_s" (best case, on P threads), the greedy tokens;
// "edit" (first-token ms after each edit, median, with prefix reuse and with KV shifting).
//
// Threads: one context per thread count (T for decode steps, P for prefill and the edit), as Rotary's
// runner uses decode_threads for steps and prefill_threads for whole contexts. A prefill's state
// is copied to the other context through a state file (not timed); the steps of the two contexts
// take turns, so the machine's other load hits both alike.
import {mkdtempSync, readFileSync, rmSync} from "node:fs";
import {tmpdir} from "node:os";
import {join} from "node:path";
import {performance} from "node:perf_hooks";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

// stdin read as a stream: readFileSync(0) fails (EAGAIN) on a pipe that is not yet all written, as a job of 4k-token contexts is not
const chunks = [];
for await (const chunk of process.stdin)
    chunks.push(chunk);
const job = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const round = (x, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;

// gpu: false and build: "never" (with no download): the prebuilt CPU binary or an error, never a cmake build.
const llama = await getLlama({
    gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true, progressLogs: false,
    maxThreads: 0, logLevel: LlamaLogLevel.error,
    logger: (level, message) => process.stderr.write(`llama.cpp ${level}: ${message}`),
});
const model = await llama.loadModel({modelPath: job.gguf, gpuLayers: 0});

const allIds = [...Object.values(job.contexts ?? {}).flat(), ...(job.edits ?? []).flatMap((e) => [e.before, e.after])];
const contextSize = Math.max(0, ...allIds.map((ids) => ids.length)) + job.steps + 16;
const threadCounts = [...new Set([job.threads, job.prefill_threads])];
const contexts = {};
for (const t of threadCounts)
    contexts[t] = await model.createContext({contextSize, sequences: 1, threads: {ideal: t, min: t}});
const sequences = Object.fromEntries(threadCounts.map((t) => [t, contexts[t].getSequence()]));
const greedy = {temperature: 0, yieldEogToken: true};

// What was loaded: the addon and ggml's CPU variant, from this process's memory map.
const maps = readFileSync("/proc/self/maps", "utf8").split("\n").map((line) => line.split(/\s+/).pop());
const loaded = [...new Set(maps.filter((p) => /llama-addon\.node$|libggml-cpu[^/]*\.so$/.test(p ?? "")))];
const nlcVersion = JSON.parse(readFileSync(new URL("node_modules/node-llama-cpp/package.json", import.meta.url), "utf8")).version;
const build = {
    "node-llama-cpp": nlcVersion,
    "llama.cpp": `${llama.llamaCppRelease.repo}@${llama.llamaCppRelease.release}`,
    binary: llama.buildType, // "prebuilt", not "localBuild"
    gpu: llama.gpu, // false
    loaded,
    threads: job.threads,
    prefill_threads: job.prefill_threads,
    batch_size: contexts[job.prefill_threads].batchSize,
    flash_attention: contexts[job.prefill_threads].flashAttention,
    context_size: contextSize,
    system_info: llama.systemInfo,
    tokens: "token ids from Rotary's tokenizer (no BOS), evaluated as given",
    edit_reuse: "sequence.adaptStateToTokens(after, false): the common prefix stays cached, from the first different token on it is evaluated (llama-server's prompt cache; LlamaCompletion's reuse); "
        + "_shift: adaptStateToTokens(after, true): the matching tokens after the edit are kept too, their KV cells shifted (llama.cpp's context shift, like llama-server's --cache-reuse)",
};
if (job.tokenize_check)
    build.tokenize_agrees = JSON.stringify(model.tokenize(job.tokenize_check.text)) === JSON.stringify(job.tokenize_check.ids);

// Decode and prefill, per case: the prefill timed on P threads (to the first greedy token), its state
// copied into the T-thread context (a state file), then the steps on each context in turn.
const stateDir = mkdtempSync(join(tmpdir(), "rotary-peer-"));
const statePath = join(stateDir, "state.bin");
const prefillSequence = sequences[job.prefill_threads];

async function copyState(from, to) {
    await from.saveStateToFile(statePath);
    await to.loadStateFromFile(statePath, {acceptRisk: true});
}

const decode = {};
for (const [length, cases] of Object.entries(job.contexts ?? {})) {
    const steps = Object.fromEntries(threadCounts.map((t) => [t, []]));
    const prefill = [];
    const tokens = [];
    for (const ids of cases) {
        await prefillSequence.clearHistory();
        const generator = prefillSequence.evaluate(ids, greedy);
        const started = performance.now();
        const first = await generator.next();
        prefill.push(ids.length / ((performance.now() - started) / 1000));
        await generator.return(); // the ids evaluated, the first token not yet
        const runs = {};
        for (const t of threadCounts) {
            if (sequences[t] !== prefillSequence)
                await copyState(prefillSequence, sequences[t]);
            runs[t] = {generator: sequences[t].evaluate([first.value], greedy), tokens: [first.value]};
        }
        for (let step = 0; step < job.steps; step++)
            for (const t of threadCounts) {
                const started = performance.now();
                const next = await runs[t].generator.next();
                steps[t].push(performance.now() - started);
                runs[t].tokens.push(next.value);
            }
        for (const t of threadCounts)
            await runs[t].generator.return();
        tokens.push(runs[job.threads].tokens);
    }
    decode[length] = {
        ms_per_token: round(median(steps[job.threads])),
        ms_per_token_by_threads: Object.fromEntries(threadCounts.map((t) => [t, round(median(steps[t]))])),
        prefill_tok_s: round(Math.max(...prefill), 1),
        greedy_tokens: tokens,
        cases: cases.length,
    };
}

// An edit: the cache of the file before it (a state file, not timed), then from the request to the first new token.
async function firstTokenAfterEdit(sequence, before, after, allowShift) {
    await sequence.loadStateFromFile(statePath, {acceptRisk: true});
    if (JSON.stringify(sequence.contextTokens) !== JSON.stringify(before))
        throw new Error("the state file did not restore the file before the edit");
    const started = performance.now();
    await sequence.adaptStateToTokens(after, allowShift);
    let kept = sequence.nextTokenIndex;
    if (JSON.stringify(sequence.contextTokens) !== JSON.stringify(after.slice(0, kept)))
        throw new Error("the cached tokens after adaptStateToTokens are not a prefix of the edited file");
    if (kept === after.length) { // nothing left to evaluate: the last token again, for its logits
        await sequence.eraseContextTokenRanges([{start: kept - 1, end: kept}]);
        kept -= 1;
    }
    const generator = sequence.evaluate(after.slice(kept), greedy);
    const first = await generator.next();
    const ms = performance.now() - started;
    await generator.return();
    return {ms, evaluated: after.length - kept, token: first.value};
}

let edit = null;
if (job.edits?.length) {
    const prefix = [];
    const shift = [];
    for (const {before, after} of job.edits) {
        await prefillSequence.clearHistory();
        await prefillSequence.evaluateWithoutGeneratingNewTokens(before);
        await prefillSequence.saveStateToFile(statePath);
        prefix.push(await firstTokenAfterEdit(prefillSequence, before, after, false));
        shift.push(await firstTokenAfterEdit(prefillSequence, before, after, true));
    }
    edit = {
        first_token_ms: round(median(prefix.map((r) => r.ms))),
        tokens_evaluated: prefix.map((r) => r.evaluated),
        first_token_ms_shift: round(median(shift.map((r) => r.ms))),
        tokens_evaluated_shift: shift.map((r) => r.evaluated),
        first_tokens: prefix.map((r) => r.token),
        first_tokens_shift: shift.map((r) => r.token),
        cases: job.edits.length,
    };
}
rmSync(stateDir, {recursive: true, force: true});

process.stdout.write(JSON.stringify({build, decode, edit}) + "\n");
for (const t of threadCounts)
    await contexts[t].dispose();
await model.dispose();
await llama.dispose();
