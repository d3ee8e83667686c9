-- Enter, then accept: the accepted line keeps exactly the indentation Neovim put there.
--   ROTARY_TEST_CMD='["rotary","lsp"]' nvim --headless -u NONE -l editors/nvim/tests/indent.lua
--
-- The child Neovim (child.lua) has filetype plugin and indent on, so Python's own
-- 'indentexpr' (indent/python.vim) indents the line Enter opens: 4 more after a line ending
-- in ":", less after `return`. Each case types a line and Enter (or `o` in normal mode, where
-- entering insert mode asks for the suggestion), waits for the ghost text, accepts it with
-- <Tab>, and compares the line character by character with the editor's indentation
-- followed by the server's own answer (recorded in the child). A suggestion that begins
-- with whitespace after the indentation doubles it (12 columns where 8 belong): that is
-- the defect of issue 7 these checks catch.
--
-- Environment: ROTARY_TEST_CMD (JSON list, required), ROTARY_TEST_TIMEOUT (seconds for the
-- first ghost text while the model loads) [120].
local here = vim.fs.dirname(debug.getinfo(1, "S").source:sub(2))
local H = dofile(here .. "/harness.lua")
local C = dofile(here .. "/child.lua")

local cmd = vim.json.decode((assert(os.getenv("ROTARY_TEST_CMD"), "set ROTARY_TEST_CMD")))
local first_timeout = tonumber(os.getenv("ROTARY_TEST_TIMEOUT") or "120") * 1000

local workdir = vim.fn.tempname()
vim.fn.mkdir(workdir, "p")
vim.fn.writefile({}, workdir .. "/pyproject.toml")
local file = workdir .. "/shapes.py"
local base = {
  "import math",
  "",
  "",
  "def area(r):",
  "    return math.pi * r ** 2",
  "",
  "",
}
vim.fn.writefile(base, file)

local child = C.start({ cmd = cmd, plugin = H.plugin_dir(), cwd = workdir, ftplugin = true })
local lua, input, wait = child.lua, child.input, child.wait

local function finish()
  child.stop()
  vim.fn.delete(workdir, "rf")
  H.finish()
end

if not H.check("the plugin starts the server and attaches the Python buffer", C.open(child, file),
  "notes: " .. vim.inspect(lua("return _G.notes"))) then
  return finish()
end
H.eq("Python's indentation is active", lua("return { vim.bo.filetype, vim.bo.indentexpr ~= '', vim.bo.shiftwidth }"),
  { "python", true, 4 })

-- Where two strings first differ (1-based), for the failure message.
local function first_difference(a, b)
  for i = 1, math.max(#a, #b) do
    if a:sub(i, i) ~= b:sub(i, i) then
      return i
    end
  end
end

local timeout = first_timeout
---@param case {name: string, lines: string[]|nil, keys: string, indent: string, code_first: boolean, line: string|nil}
--  lines: the buffer (default: base, cursor on its last line); keys: typed from normal mode;
--  indent: what the editor must have put before the cursor; line: the whole line before the
--  cursor when it is more than the indentation (mid-identifier); code_first: the suggestion
--  must start with code at the cursor (no whitespace, no newline).
local function enter_then_accept(case)
  local name = case.name
  input("<Esc>")
  wait(2000, function() return lua("return T.state()").mode == "n" end)
  local lines = case.lines or base
  lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", lines)
  lua("vim.api.nvim_win_set_cursor(0, {" .. #lines .. ", 0})")
  input(case.keys)
  local want_line = case.line or case.indent
  local at = wait(5000, function()
    local s = lua("return T.state()")
    return s.mode == "i" and lua("return vim.api.nvim_get_current_line()") == want_line and s.cursor[2] == #want_line
  end)
  if not H.check(name .. ": the editor put " .. vim.inspect(want_line) .. " before the cursor", at,
    vim.inspect({ line = lua("return vim.api.nvim_get_current_line()"), state = lua("return T.state()") })) then
    return
  end
  local g = child.ghost(timeout)
  timeout = 60000
  if not H.check(name .. ": ghost text appears", g ~= nil,
    "status: " .. vim.inspect(lua("return require('rotary.client').status"))) then
    return
  end
  local reply = lua("return T.reply()")
  if not H.check(name .. ": the server's reply for this position was received", reply ~= nil) then
    return
  end
  io.stdout:write(("# %s: suggestion %s\n"):format(name, vim.inspect(reply.insert)))
  H.eq(name .. ": the ghost text is the server's suggestion", g.text, reply.shows)
  local row = lua("return T.state()").cursor[1]
  input("<Tab>")
  local accepted = wait(5000, function() return vim.deep_equal(lua("return T.lines()"), reply.after) end)
  H.check(name .. ": <Tab> inserts exactly the server's suggestion", accepted,
    ("got %s want %s"):format(vim.inspect(lua("return T.lines()")), vim.inspect(reply.after)))
  local line = lua("return vim.api.nvim_buf_get_lines(0, ...)", row - 1, row, false)[1]
  local suggestion_line = reply.shows:match("^[^\n]*")
  local want = want_line .. suggestion_line
  H.check(name .. ": the accepted line is the text before the cursor followed by the suggestion", line == want,
    ("line %s, want %s (first difference at column %s)"):format(vim.inspect(line), vim.inspect(want),
      tostring((first_difference(line, want)))))
  local indentation = line:match("^[ \t]*")
  H.check(name .. (": the accepted line keeps the editor's indentation (%d columns)"):format(#case.indent),
    indentation == case.indent,
    ("line %s has %d columns of indentation, the editor put %d: the suggestion %s repeats it")
      :format(vim.inspect(line), #indentation, #case.indent, vim.inspect(reply.insert)))
  if case.code_first then
    H.check(name .. ": the suggestion starts with code at the cursor (no whitespace, no newline)",
      reply.shows:match("^%s") == nil, vim.inspect(reply.shows))
  end
end

-- A block opener typed at column 0, then Enter: Python indents by 4.
enter_then_accept({ name = "def + Enter", keys = "idef add(a, b):<CR>", indent = "    ", code_first = true })

-- The issue's case: Enter after `    with open(path) as f:` gives 8 columns.
enter_then_accept({
  name = "with + Enter",
  keys = "idef read_lines(path):<CR>with open(path) as f:<CR>",
  indent = "        ",
  code_first = true,
})

-- `o` in normal mode on the block opener: the indented line gets a suggestion on entering
-- insert mode, before any keystroke.
local with_lines = vim.list_extend(vim.deepcopy(base), { "def read_lines(path):", "    with open(path) as f:" })
enter_then_accept({ name = "o after with", lines = with_lines, keys = "o", indent = "        ", code_first = true })

-- Column 0: after `return`, Python dedents the next line to column 0.
enter_then_accept({
  name = "column 0 after return",
  keys = "idef add(a, b):<CR>return a + b<CR>",
  indent = "",
  code_first = false,
})

-- Mid-identifier: the suggestion continues `math.p`, at the cursor, without whitespace.
enter_then_accept({
  name = "mid-identifier",
  keys = "idef circumference(r):<CR>return 2 * math.p",
  indent = "    ",
  line = "    return 2 * math.p",
  code_first = true,
})

finish()
