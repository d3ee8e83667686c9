-- End-to-end test of the Neovim plugin with a language server:
--   ROTARY_TEST_CMD='["rotary","lsp"]' nvim --headless -u NONE -l editors/nvim/tests/e2e.lua
--
-- A second Neovim, driven over RPC (child.lua), loads the plugin and starts the server, so
-- keys go through its ordinary input loop as typed by a user. Every check compares with the
-- server's own answer to the request that produced the ghost text (recorded in the child).
-- Every check runs with both servers, none depends on what the model happened to suggest;
-- only the fake server's extras (two items to cycle through, the raw settings payload it
-- recorded) are checked with the fake server alone.
--
-- Environment:
--   ROTARY_TEST_CMD      JSON list: the server command (required)
--   ROTARY_TEST_EXACT    JSON string: the suggestion the fake server shows first; set only
--                        for tests/editors/fake_server.py, which also offers two items to
--                        cycle through and records what the client sent
--   ROTARY_TEST_TIMEOUT  seconds to wait for the first ghost text (the model loads) [120]
local here = vim.fs.dirname(debug.getinfo(1, "S").source:sub(2))
local H = dofile(here .. "/harness.lua")
local C = dofile(here .. "/child.lua")

local cmd = vim.json.decode((assert(os.getenv("ROTARY_TEST_CMD"), "set ROTARY_TEST_CMD")))
local exact = os.getenv("ROTARY_TEST_EXACT") and vim.json.decode(os.getenv("ROTARY_TEST_EXACT")) or nil
local first_timeout = tonumber(os.getenv("ROTARY_TEST_TIMEOUT") or "120") * 1000

local workdir = vim.fn.tempname()
vim.fn.mkdir(workdir, "p")
vim.fn.writefile({}, workdir .. "/pyproject.toml")
local file = workdir .. "/shapes.py"
vim.fn.writefile({
  "import math",
  "",
  "",
  "def add(a, b):",
  "    return a + b",
  "",
  "",
  "def mul(a, b):",
  "",
}, file)

local child = C.start({ cmd = cmd, plugin = H.plugin_dir(), cwd = workdir })
local lua, input, wait = child.lua, child.input, child.wait

local function finish()
  child.stop()
  vim.fn.delete(workdir, "rf")
  H.finish()
end

-- `lines` with `text` inserted at (row, col) (0-based, bytes).
local function inserted_at(lines, row, col, text)
  local out = vim.deepcopy(lines)
  local line = out[row + 1]
  local new = vim.split(line:sub(1, col) .. text .. line:sub(col + 1), "\n", { plain = true })
  table.remove(out, row + 1)
  for i = #new, 1, -1 do
    table.insert(out, row + 1, new[i])
  end
  return out
end

local function daemon()
  local stats = lua("return T.stats()")
  return type(stats) == "table" and stats.daemon or nil
end

-- Reset the file to `lines`, put the cursor on line 9 and type `keys` in insert mode;
-- wait for the typed text and then for ghost text.
local function type_on_line9(lines, keys, want_line, timeout)
  input("<Esc>")
  wait(2000, function() return lua("return T.state()").mode == "n" end)
  lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", lines)
  lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
  input(keys)
  local typed = wait(5000, function() return lua("return vim.api.nvim_get_current_line()") == want_line end)
  H.check("typing reached the buffer: " .. want_line, typed, lua("return vim.api.nvim_get_current_line()"))
  return child.ghost(timeout or 30000)
end

if not H.check("the plugin starts the server and attaches the Python buffer", C.open(child, file),
  "notes: " .. vim.inspect(lua("return _G.notes"))) then
  return finish()
end

local caps = lua("return vim.lsp.get_clients({ name = 'rotary' })[1].server_capabilities")
H.check("the server offers inline completion", caps.inlineCompletionProvider ~= nil)
local commands = lua("return require('rotary.client').server_commands()")
H.check("server commands are read from executeCommandProvider", vim.tbl_contains(commands, "rotary.stats"),
  vim.inspect(commands))
H.eq(":Rotary completion lists them", lua([[return vim.tbl_filter(function(c) return c:match('^rotary%.') end,
  require('rotary.commands').complete('', 'Rotary '))]]), commands)

-- 1. Type at the end of mul(): the ghost text appears, and it is the server's answer.
local before_lines = lua("return T.lines()")
lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
input("i    return")
H.check("typing reached the buffer", wait(5000, function()
  return lua("return vim.api.nvim_get_current_line()") == "    return"
end), lua("return vim.api.nvim_get_current_line()"))
local g = child.ghost(first_timeout)
if not H.check("after typing, ghost text appears", g ~= nil,
  "status: " .. vim.inspect(lua("return require('rotary.client').status"))) then
  return finish()
end
H.eq("the ghost text sits at the cursor", { g.row, g.col }, { 8, 10 })
H.eq("its first line is inline virtual text", g.inline, "inline")
H.eq("one extmark", g.count, 1)
local reply = lua("return T.reply()")
if not H.check("the server's reply for this position was received", reply ~= nil, vim.inspect(lua("return T.replies"))) then
  return finish()
end
H.eq("the ghost text is what the server's item inserts at the cursor", g.text, reply.shows)
if exact then
  H.eq("the ghost text is the fake server's suggestion", g.text, exact)
end
local shown_text = g.text
io.stdout:write("# suggestion: " .. vim.inspect(reply.insert) .. "\n")
H.check("the suggestion continues the line (mid-line: single line, not starting with a newline)",
  shown_text:match("^[^\n]") ~= nil, vim.inspect(shown_text))
local d = daemon()
H.eq("rotary.stats' last_completion is that answer", d and d.last_completion and d.last_completion.text, reply.insert)
local status = lua("return require('rotary.client').status")
H.eq("rotary/status reached the plugin", status.state, "ready")
H.check("statusline shows the status", lua("return require('rotary').statusline()"):match("^Rotary: ") ~= nil,
  lua("return require('rotary').statusline()"))

-- 2. Accept with <Tab>: the buffer is the server's item applied, the cursor at its end.
local d0 = daemon()
input("<Tab>")
H.check("<Tab> inserts exactly the server's suggestion", wait(5000, function()
  return vim.deep_equal(lua("return T.lines()"), reply.after)
end), ("got %s want %s"):format(vim.inspect(lua("return T.lines()")), vim.inspect(reply.after)))
local end_pos = lua("return { require('rotary.text').end_position(8, 10, ...) }", shown_text)
H.eq("the cursor ends after the inserted text", lua("return T.state()").cursor, { end_pos[1] + 1, end_pos[2] })
H.check("accepting removes the ghost text", wait(2000, function() return lua("return T.ghost()") == nil end))
local d1
wait(5000, function()
  d1 = daemon()
  return d1.accepted ~= d0.accepted
end)
H.eq("the server counted one full accept", d1.accepted - d0.accepted, 1)
H.eq("with the item's length as accepted characters", d1.accepted_chars - d0.accepted_chars,
  lua("return require('rotary.text').char_count(...)", reply.insert))
H.check("the suggestion was reported as shown", d1.shown >= 1, vim.inspect(d1))
if exact then
  local acc = lua("return T.stats()").accepted
  acc = acc[#acc]
  H.check("full accept reported with the item's command arguments", acc and acc.full == true
    and acc.acceptedLength == vim.fn.strchars(reply.insert), vim.inspect(acc))
end

-- 3. Dismiss: <Esc> leaves insert mode and removes the ghost text; <C-]> removes it and
--    stays in insert mode; neither changes the buffer.
g = type_on_line9(before_lines, "i    return", "    return")
H.check("ghost text appears again", g ~= nil)
input("<Esc>")
H.check("<Esc> dismisses the ghost text", wait(3000, function() return lua("return T.ghost()") == nil end))
H.eq("dismissing does not change the buffer", lua("return T.lines()"), inserted_at(before_lines, 8, 0, "    return"))

g = type_on_line9(before_lines, "i    return", "    return")
H.check("ghost text shown before <C-]>", g ~= nil)
local tick = lua("return T.state()").tick
input("<C-]>")
H.check("<C-]> dismisses the ghost text", wait(3000, function() return lua("return T.ghost()") == nil end))
local after_dismiss = lua("return T.state()")
H.eq("<C-]> stays in insert mode", after_dismiss.mode, "i")
H.eq("<C-]> does not change the buffer", { after_dismiss.tick, lua("return T.lines()") },
  { tick, inserted_at(before_lines, 8, 0, "    return") })
H.eq("<C-]> keeps the cursor", after_dismiss.cursor, { 9, 10 })

-- 3b. <Tab> with no suggestion shown does what <Tab> does without the plugin: a real Tab
--     with 'noexpandtab', spaces to the next 'softtabstop' with 'expandtab'.
lua("vim.bo.expandtab = false; vim.bo.softtabstop = 0")
input("<Tab>")
H.check("<Tab> without a suggestion inserts a Tab character", wait(3000, function()
  return lua("return vim.api.nvim_get_current_line()") == "    return\t"
end), vim.inspect(lua("return vim.api.nvim_get_current_line()")))
-- The Tab asked for a suggestion again: without auto-trigger nothing can show up now.
lua("require('rotary.config').options.ghost_text.auto_trigger = false")
input("<C-]>")
wait(3000, function() return lua("return T.ghost()") == nil end)
lua("vim.bo.expandtab = true; vim.bo.softtabstop = 4; vim.api.nvim_set_current_line('    return'); "
  .. "vim.api.nvim_win_set_cursor(0, {9, 10})")
input("<Tab>")
H.check("<Tab> without a suggestion follows 'expandtab' and 'softtabstop'", wait(3000, function()
  return lua("return vim.api.nvim_get_current_line()") == "    return  "
end), vim.inspect(lua("return vim.api.nvim_get_current_line()")))
lua("vim.bo.expandtab = false; vim.bo.softtabstop = 0")
lua("require('rotary.config').options.ghost_text.auto_trigger = true")

-- 4. Dismiss on cursor move.
g = type_on_line9(before_lines, "i    return", "    return")
H.check("ghost text shown before the move", g ~= nil)
input("<Left>")
H.check("moving the cursor dismisses the ghost text", wait(3000, function() return lua("return T.ghost()") == nil end))

-- 5. Accept word, then accept line: each inserts the suggestion's next part, the rest stays
--    shown, and the server counts the parts.
g = type_on_line9(before_lines, "i    return", "    return")
if not H.check("ghost text for partial accepts", g ~= nil) then
  return finish()
end
reply = lua("return T.reply()")
H.eq("it is the server's answer", g.text, reply and reply.shows)
local full = g.text
local word = lua("return require('rotary.text').next_word(...)", full)
H.check("the suggestion has more than one word (so accept word takes a part of it)", #word < #full,
  vim.inspect(full))
d0 = daemon()
input("<M-Right>")
H.check("accept word inserts the next word", wait(3000, function()
  return vim.deep_equal(lua("return T.lines()"), inserted_at(before_lines, 8, 0, "    return" .. word))
end), vim.inspect(lua("return T.lines()")) .. " want word " .. vim.inspect(word))
local rest = full:sub(#word + 1)
local rest_ghost = lua("return T.ghost()")
H.eq("the rest stays as ghost text", rest_ghost and rest_ghost.text, rest)
local line = lua("return require('rotary.text').next_line(...)", rest)
input("<M-C-Right>")
H.check("accept line inserts the rest of the line", wait(3000, function()
  return vim.deep_equal(lua("return T.lines()"), inserted_at(before_lines, 8, 0, "    return" .. word .. line))
end), vim.inspect(lua("return T.lines()")) .. " want line " .. vim.inspect(line))
local left = rest:sub(#line + 1)
wait(2000, function()
  local gh = lua("return T.ghost()")
  return (gh and gh.text) == (left ~= "" and left or nil)
end)
local left_ghost = lua("return T.ghost()")
H.eq("what the two accepts left is still shown", left_ghost and left_ghost.text, left ~= "" and left or nil)
wait(5000, function()
  d1 = daemon()
  return d1.accepted_chars - d0.accepted_chars == vim.fn.strchars(word .. line)
end)
-- Accept line takes what is left when it is the last line: then it is a full accept.
H.eq("the server counted the partial accepts", d1.accepted_partial - d0.accepted_partial, left == "" and 1 or 2)
H.eq("and the full accept, when accept line took the rest", d1.accepted - d0.accepted, left == "" and 1 or 0)
H.eq("with the characters inserted", d1.accepted_chars - d0.accepted_chars, vim.fn.strchars(word .. line))

-- 5b. Typing the suggestion's next character keeps the rest (type-through).
g = type_on_line9(before_lines, "i    return", "    return")
if H.check("ghost text for type-through", g ~= nil) then
  local next_char = g.text:sub(1, 1)
  H.check("it starts on the cursor's line", next_char ~= "\n", vim.inspect(g.text))
  input(next_char == "<" and "<lt>" or next_char)
  local typed_through
  wait(3000, function()
    typed_through = lua("return T.ghost()")
    return typed_through ~= nil and typed_through.text ~= g.text
  end)
  H.eq("typing its next character keeps the rest of the suggestion", typed_through and typed_through.text, g.text:sub(2))
  H.eq("and moves it to the cursor", typed_through and { typed_through.row, typed_through.col }, { 8, 11 })
end

-- 5c. Entering insert mode asks for a suggestion (auto-trigger), before any keystroke.
input("<Esc>")
wait(2000, function() return lua("return T.state()").mode == "n" end)
lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", inserted_at(before_lines, 8, 0, "    return"))
lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
tick = lua("return T.state()").tick
input("A")
g = child.ghost(30000)
H.check("entering insert mode (A) shows ghost text without a keystroke", g ~= nil and lua("return T.state()").tick == tick,
  vim.inspect(lua("return T.state()")))
reply = lua("return T.reply()")
H.eq("at the cursor, from the server's answer", g and { g.row, g.col, g.text }, { 8, 10, reply and reply.shows })
input("<Esc>")

-- 5d. Cycling through several suggestions (only the fake server offers two).
if exact then
  wait(500, function() return lua("return T.state()").mode == "n" end)
  local two = vim.deepcopy(before_lines)
  two[1] = "import math  # two"
  g = type_on_line9(two, "i    return", "    return", 10000)
  H.eq("the fake server offered two items", lua("return T.reply()").count, 2)
  input("<M-]>")
  local second
  wait(3000, function()
    second = lua("return T.ghost()")
    return second ~= nil and second.text ~= g.text
  end)
  H.eq("<M-]> shows the next suggestion", second and second.text, "(x):\n    pass")
  input("<M-[>")
  local back
  wait(3000, function()
    back = lua("return T.ghost()")
    return back ~= nil and back.text == g.text
  end)
  H.eq("<M-[> goes back", back and back.text, g.text)
  input("<Esc>")
  lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", before_lines)
end

-- 6. Commands: :Rotary status and a server command by name; settings reach the server.
wait(2000, function() return lua("return T.state()").mode == "n" end)
lua("_G.notes = {}")
lua("vim.cmd('Rotary status')")
H.check(":Rotary status reports the server", wait(2000, function()
  local notes = lua("return _G.notes")
  return notes[1] ~= nil and notes[1]:match("server: running") ~= nil
end), vim.inspect(lua("return _G.notes")))
lua("_G.notes = {}")
lua("vim.cmd('Rotary rotary.stats')")
H.check(":Rotary rotary.stats runs the server command", wait(10000, function()
  local notes = lua("return _G.notes")
  return notes[1] ~= nil and notes[1]:match("^Rotary rotary.stats") ~= nil
end), vim.inspect(lua("return _G.notes")))
H.eq("the server started with the plugin's settings (initializationOptions)", daemon().settings.maxTokens, 64)
lua("require('rotary').configure({ maxTokens = 7 })")
local got
wait(3000, function()
  got = daemon().settings.maxTokens
  return got == 7
end)
H.eq("configure() reaches the server (didChangeConfiguration)", got, 7)
if exact then
  H.eq("didChangeConfiguration sends {settings={rotary=...}}", lua("return T.stats()").settings.rotary.maxTokens, 7)
end
lua("require('rotary').configure({ maxTokens = 64 })")
lua("_G.notes = {}")
lua("vim.cmd('Rotary toggle')")
H.check(":Rotary toggle uses rotary.toggle", wait(3000, function()
  local notes = lua("return _G.notes")
  return notes[1] == "Rotary completions disabled"
end), vim.inspect(lua("return _G.notes")))
lua("_G.notes = {}")
lua("vim.cmd('Rotary toggle')")
H.check(":Rotary toggle turns them on again", wait(3000, function()
  return lua("return _G.notes")[1] == "Rotary completions enabled"
end), vim.inspect(lua("return _G.notes")))

-- 7. :checkhealth rotary
lua("vim.cmd('checkhealth rotary')")
local health = table.concat(lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)"), "\n")
io.stdout:write("# " .. health:gsub("\n", "\n# ") .. "\n")
H.check(":checkhealth rotary finds the server", health:match("OK[^\n]*[Ss]erver") ~= nil, health)
H.check(":checkhealth rotary reports no errors", health:match("ERROR") == nil, health)

finish()
