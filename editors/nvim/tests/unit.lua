-- Unit tests of the plugin's own logic (no server, no UI):
--   nvim --headless -u NONE -l editors/nvim/tests/unit.lua
local H = dofile(vim.fs.dirname(debug.getinfo(1, "S").source:sub(2)) .. "/harness.lua")
vim.opt.rtp:prepend(H.plugin_dir())

local text = require("rotary.text")

-- remaining(): what is still to show given what the buffer has from the range start.
H.eq("remaining: empty typed", text.remaining("abc", ""), "abc")
H.eq("remaining: typed prefix", text.remaining("add(a, b)", "add"), "(a, b)")
H.eq("remaining: diverged", text.remaining("add(a, b)", "ado"), nil)
H.eq("remaining: fully typed", text.remaining("add", "add"), "")

-- next_word(): whitespace (newlines included) then one word or one run of punctuation.
H.eq("word: identifier", text.next_word("foo(bar)"), "foo")
H.eq("word: leading space", text.next_word("  return a + b"), "  return")
H.eq("word: punctuation run", text.next_word("(a, b):"), "(")
H.eq("word: operator run", text.next_word(" += 1"), " +=")
H.eq("word: newline and indent", text.next_word("\n    return x"), "\n    return")
H.eq("word: only whitespace", text.next_word("  \n "), "  \n ")
H.eq("word: non-ascii identifier kept whole", text.next_word("größe = 1"), "größe")
H.eq("word: empty", text.next_word(""), "")

-- next_line(): up to the newline; from a newline, that newline and the next line.
H.eq("line: first line", text.next_line("(a, b):\n    return a + b"), "(a, b):")
H.eq("line: from newline", text.next_line("\n    return a + b\nx"), "\n    return a + b")
H.eq("line: single line", text.next_line("abc"), "abc")
H.eq("line: trailing newline", text.next_line("\n"), "\n")

-- Walking a suggestion by words or lines rebuilds it exactly.
local function walk(s, step)
  local parts, guard = {}, 0
  while s ~= "" and guard < 100 do
    local p = step(s)
    assert(#p > 0, "step made no progress")
    parts[#parts + 1] = p
    s = s:sub(#p + 1)
    guard = guard + 1
  end
  return parts
end
local sample = "(a, b):\n    return a + b\n\n# end"
H.eq("walk by words rebuilds", table.concat(walk(sample, text.next_word)), sample)
H.eq("walk by lines rebuilds", table.concat(walk(sample, text.next_line)), sample)
H.eq("walk by lines parts", walk(sample, text.next_line), { "(a, b):", "\n    return a + b", "\n", "\n# end" })

-- split_lines() / end_position(): what the extmark draws and where the cursor lands.
local first, rest = text.split_lines("x = 1\n  y\n")
H.eq("split: first", first, "x = 1")
H.eq("split: rest", rest, { "  y", "" })
H.eq("end: same line", { text.end_position(3, 4, "abc") }, { 3, 7 })
H.eq("end: multi-line", { text.end_position(3, 4, "a\n  bc") }, { 4, 4 })
H.eq("end: ends with newline", { text.end_position(3, 4, "a\n") }, { 4, 0 })

-- char_count(): code points, as the server's Python len() counts acceptedLength.
H.eq("chars: ascii", text.char_count("abc"), 3)
H.eq("chars: utf-8", text.char_count("größe"), 5)
H.eq("chars: emoji", text.char_count("a😀"), 2)

-- config: user lists replace the defaults; settings merge key by key.
local config = require("rotary.config")
local opts = config.setup({ filetypes = { "python" }, settings = { maxTokens = 16 }, cmd = "/x/rotary" })
H.eq("config: filetypes replaced", opts.filetypes, { "python" })
H.eq("config: settings merged", opts.settings.maxTokens, 16)
H.eq("config: other settings kept", opts.settings.completionMode, "auto")
H.eq("config: cmd string gets lsp", opts.cmd, { "/x/rotary", "lsp" })
H.eq("config: defaults untouched", config.defaults.settings.maxTokens, 64)

-- The settings tree matches the server's keys and defaults (the contract).
H.eq("config: server settings", config.defaults.settings, {
  enabled = true, workerAddress = "", model = "", maxTokens = 64,
  completionMode = "auto", debounceMs = 50, editAwareCache = true,
  abstainThreshold = -1, decodingMode = "lossless", exitThreshold = -1,
})

-- Every module loads; the 0.12 path is chosen only where vim.lsp.inline_completion exists.
for _, mod in ipairs({ "rotary", "rotary.client", "rotary.ghost", "rotary.native", "rotary.keymaps",
  "rotary.commands", "rotary.health" }) do
  local ok, err = pcall(require, mod)
  H.check("loads " .. mod, ok, tostring(err))
end
H.eq("native renderer only on 0.12+", require("rotary.native").use(),
  vim.fn.has("nvim-0.12") == 1 and vim.lsp.inline_completion ~= nil)
config.setup({ ghost_text = { native = false } })
H.eq("native = false forces the extmark renderer", require("rotary.native").use(), false)

-- :Rotary completion offers the plugin's subcommands even without a server.
H.eq("command completion", require("rotary.commands").complete("st", "Rotary st"), { "status" })

H.finish()
