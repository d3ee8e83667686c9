-- End-to-end test of the Neovim plugin with a real language server:
--   ROTARY_TEST_CMD='["rotary","lsp"]' nvim --headless -u NONE -l editors/nvim/tests/e2e.lua
--
-- This script drives a second Neovim (`nvim --embed --headless`) over RPC, so keys go
-- through the child's ordinary input loop exactly as typed by a user: insert mode,
-- TextChangedI/CursorMovedI, mappings. The child loads the plugin and starts the server.
--
-- Environment:
--   ROTARY_TEST_CMD      JSON list: the server command (required)
--   ROTARY_TEST_EXACT    JSON string: the suggestion the server must show first (the fake
--                        server's); unset with the real model, which is checked against
--                        the server's own answer to the same request instead
--   ROTARY_TEST_TIMEOUT  seconds to wait for the first ghost text (the model loads) [120]
local H = dofile(vim.fs.dirname(debug.getinfo(1, "S").source:sub(2)) .. "/harness.lua")

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

local child = vim.fn.jobstart({ vim.v.progpath, "--embed", "--headless", "-u", "NONE", "-i", "NONE", "-n" }, {
  rpc = true,
  cwd = workdir,
})
assert(child > 0, "could not start the child nvim")

local function lua(code, ...)
  local result = vim.rpcrequest(child, "nvim_exec_lua", code, { ... })
  if result == vim.NIL then
    return nil
  end
  return result
end
local function input(keys)
  vim.rpcrequest(child, "nvim_input", keys)
end
local function wait(ms, fn)
  return vim.wait(ms, function()
    return fn()
  end, 20)
end

local function finish()
  pcall(lua, "for _, c in ipairs(vim.lsp.get_clients({name='rotary'})) do c:stop(true) end")
  vim.wait(300)
  pcall(vim.fn.jobstop, child)
  vim.fn.delete(workdir, "rf")
  H.finish()
end

-- Child set-up: the plugin on the runtimepath, filetype detection, the server command.
lua([[
  local plugin, cmd = ...
  vim.opt.rtp:prepend(plugin)
  vim.o.swapfile = false
  vim.o.shortmess = vim.o.shortmess .. "I"
  vim.cmd("filetype on")
  _G.notes = {}
  vim.notify = function(msg, level) table.insert(_G.notes, msg) end
  require("rotary").setup({ cmd = cmd, filetypes = { "python" }, ghost_text = { debounce_ms = 10 } })
]], H.plugin_dir(), cmd)

-- Helpers evaluated in the child.
lua([[
  local ghost = require("rotary.ghost")
  _G.T = {}
  -- The ghost text as drawn: inline first line + virtual lines, joined with "\n".
  function T.ghost()
    local marks = vim.api.nvim_buf_get_extmarks(0, ghost.ns, 0, -1, { details = true })
    if #marks == 0 then return nil end
    local d = marks[1][4]
    local first = d.virt_text and table.concat(vim.tbl_map(function(c) return c[1] end, d.virt_text)) or ""
    local lines = { first }
    for _, vl in ipairs(d.virt_lines or {}) do
      lines[#lines + 1] = table.concat(vim.tbl_map(function(c) return c[1] end, vl))
    end
    return { text = table.concat(lines, "\n"), row = marks[1][2], col = marks[1][3], count = #marks,
             inline = d.virt_text_pos }
  end
  -- The server's answer to the same request, at the cursor, as the text to insert there.
  function T.server_suggestion()
    local client = vim.lsp.get_clients({ name = "rotary", bufnr = 0 })[1]
    local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
    params.context = { triggerKind = 1 }
    local res = vim.lsp.buf_request_sync(0, "textDocument/inlineCompletion", params, 60000)
    local r = res and res[client.id] and res[client.id].result
    local items = r and (r.items or r) or {}
    local item = items[1]
    if not item then return nil end
    local insert = type(item.insertText) == "table" and item.insertText.value or item.insertText
    local cur = vim.api.nvim_win_get_cursor(0)
    local typed = ""
    if item.range then
      local line = vim.api.nvim_buf_get_lines(0, item.range.start.line, item.range.start.line + 1, false)[1]
      local sc = vim.str_byteindex(line, client.offset_encoding, item.range.start.character, false)
      typed = table.concat(vim.api.nvim_buf_get_text(0, item.range.start.line, sc, cur[1] - 1, cur[2], {}), "\n")
    end
    return require("rotary.text").remaining(insert, typed)
  end
  function T.stats()
    local client = vim.lsp.get_clients({ name = "rotary" })[1]
    local res = client:request_sync("workspace/executeCommand", { command = "rotary.stats" }, 10000, 0)
    return res and res.result
  end
  function T.lines() return vim.api.nvim_buf_get_lines(0, 0, -1, false) end
  function T.state()
    return { mode = vim.api.nvim_get_mode().mode, cursor = vim.api.nvim_win_get_cursor(0), tick = vim.b.changedtick }
  end
]])

lua("vim.cmd.edit(...)", file)
local attached = wait(20000, function()
  return lua("return #vim.lsp.get_clients({ name = 'rotary', bufnr = 0 }) == 1 and vim.lsp.get_clients({ name = 'rotary' })[1].initialized == true")
end)
if not H.check("the plugin starts the server and attaches the Python buffer", attached,
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

-- 1. Type at the end of mul(): the ghost text appears.
local before_lines = lua("return T.lines()")
lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
input("i    return")
local typed_ok = wait(5000, function()
  return lua("return vim.api.nvim_get_current_line()") == "    return"
end)
H.check("typing reached the buffer", typed_ok, lua("return vim.api.nvim_get_current_line()"))
local g
wait(first_timeout, function()
  g = lua("return T.ghost()")
  return g ~= nil
end)
if not H.check("after typing, ghost text appears", g ~= nil, "status: " .. vim.inspect(lua("return require('rotary.client').status"))) then
  return finish()
end
H.eq("the ghost text sits at the cursor", { g.row, g.col }, { 8, 10 })
H.eq("its first line is inline virtual text", g.inline, "inline")
H.eq("one extmark", g.count, 1)
local shown_text = g.text
if exact then
  H.eq("the ghost text is the server's suggestion (fake server)", shown_text, exact)
end
local server_text = lua("return T.server_suggestion()")
H.eq("the ghost text equals what the server returns for the same request", shown_text, server_text)
local status = lua("return require('rotary.client').status")
H.eq("rotary/status reached the plugin", status.state, "ready")
H.check("statusline shows the status", lua("return require('rotary').statusline()"):match("^Rotary: ") ~= nil,
  lua("return require('rotary').statusline()"))

-- 2. Accept with <Tab>: exactly that text is inserted, the cursor goes to its end.
local stats_before = lua("return T.stats()")
input("<Tab>")
local expected_lines = vim.deepcopy(before_lines)
local inserted = vim.split("    return" .. shown_text, "\n", { plain = true })
expected_lines[9] = inserted[1]
for i = 2, #inserted do
  table.insert(expected_lines, 8 + i, inserted[i])
end
local accepted = wait(5000, function()
  return vim.deep_equal(lua("return T.lines()"), expected_lines)
end)
H.check("<Tab> inserts exactly the suggestion", accepted,
  ("got %s want %s"):format(vim.inspect(lua("return T.lines()")), vim.inspect(expected_lines)))
local last = inserted[#inserted]
H.eq("the cursor ends after the inserted text", lua("return T.state()").cursor, { 8 + #inserted, #last })
H.check("accepting removes the ghost text", wait(2000, function() return lua("return T.ghost()") == nil end))
-- The server counted it (the item's command, rotary.suggestionAccepted).
local stats_after
wait(5000, function()
  stats_after = lua("return T.stats()")
  return not vim.deep_equal(stats_after, stats_before)
end)
H.check("the accept was reported to the server (rotary.stats changed)", not vim.deep_equal(stats_after, stats_before),
  vim.inspect(stats_after))
io.stdout:write("# suggestion: " .. vim.inspect(shown_text) .. "\n")
if type(stats_after) == "table" and stats_after.daemon then -- the real server's counters
  local d0, d1 = stats_before.daemon, stats_after.daemon
  H.eq("the server counted one full accept", d1.accepted - d0.accepted, 1)
  H.eq("with the accepted characters", d1.accepted_chars - d0.accepted_chars, vim.fn.strchars(shown_text))
  H.check("the suggestion was reported as shown", d1.shown >= 1, vim.inspect(d1))
end
if exact then
  local acc = stats_after.accepted[#stats_after.accepted]
  H.check("full accept reported with full=true", acc and acc.full == true and acc.acceptedLength > 0, vim.inspect(acc))
  H.check("the shown suggestion was reported", #stats_after.shown >= 1 and stats_after.shown[1].id == acc.id,
    vim.inspect(stats_after.shown))
end

-- 3. Dismiss: leaving insert mode removes the ghost text and leaves the buffer alone.
input("<Esc>")
wait(500, function() return lua("return T.state()").mode == "n" end)
lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", before_lines)
lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
input("i    return")
g = nil
wait(30000, function()
  g = lua("return T.ghost()")
  return g ~= nil
end)
H.check("ghost text appears again", g ~= nil)
input("<Esc>")
H.check("<Esc> dismisses the ghost text", wait(3000, function() return lua("return T.ghost()") == nil end))
H.eq("dismissing does not change the buffer", lua("return T.lines()")[9], "    return")

-- 4. Dismiss on cursor move.
input("Ax<BS>") -- a keystroke asks for a suggestion
g = nil
wait(30000, function()
  g = lua("return T.ghost()")
  return g ~= nil
end)
H.check("ghost text shown before the move", g ~= nil)
input("<Left>")
H.check("moving the cursor dismisses the ghost text", wait(3000, function() return lua("return T.ghost()") == nil end))

-- 5. Accept word, then accept line: partial accepts insert the suggestion's next parts.
input("<End>")
g = nil
input(" <BS>")
wait(30000, function()
  g = lua("return T.ghost()")
  return g ~= nil
end)
if H.check("ghost text for partial accepts", g ~= nil) then
  local full = g.text
  local word = lua("return require('rotary.text').next_word(...)", full)
  input("<M-Right>")
  local want = "    return" .. word
  local ok_word = wait(3000, function()
    return table.concat(lua("return vim.api.nvim_buf_get_lines(0, 8, -1, false)"), "\n"):sub(1, #want) == want
  end)
  H.check("accept word inserts the next word", ok_word,
    vim.inspect(lua("return vim.api.nvim_buf_get_lines(0, 8, -1, false)")) .. " want prefix " .. vim.inspect(want))
  local rest_ghost = lua("return T.ghost()")
  if #word < #full then
    H.eq("the rest stays as ghost text", rest_ghost and rest_ghost.text, full:sub(#word + 1))
    local line = lua("return require('rotary.text').next_line(...)", full:sub(#word + 1))
    input("<M-C-Right>")
    local want2 = "    return" .. word .. line
    H.check("accept line inserts the rest of the line", wait(3000, function()
      return table.concat(lua("return vim.api.nvim_buf_get_lines(0, 8, -1, false)"), "\n"):sub(1, #want2) == want2
    end), vim.inspect(lua("return vim.api.nvim_buf_get_lines(0, 8, -1, false)")))
  end
  local stats = lua("return T.stats()")
  if stats.daemon then
    H.check("the server counted the partial accepts", (stats.daemon.accepted_partial or 0) >= 1, vim.inspect(stats.daemon))
  end
  if exact then
    local partial = vim.tbl_filter(function(a) return a.full == false end, stats.accepted)
    H.check("partial accepts reported with full=false", #partial >= 1 and partial[1].acceptedLength == vim.fn.strchars(word),
      vim.inspect(stats.accepted))
  end
end
input("<Esc>")

-- 5b. Typing the suggestion's next character keeps the rest (type-through).
wait(500, function() return lua("return T.state()").mode == "n" end)
lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", before_lines)
lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
input("i    return")
g = nil
wait(30000, function()
  g = lua("return T.ghost()")
  return g ~= nil
end)
local next_char = g and g.text:match("^[^\n]")
if H.check("ghost text for type-through", g ~= nil) and next_char then
  input(next_char == "<" and "<lt>" or next_char)
  local rest
  wait(3000, function()
    rest = lua("return T.ghost()")
    return rest ~= nil and rest.text ~= g.text
  end)
  H.eq("typing its next character keeps the rest of the suggestion", rest and rest.text, g.text:sub(2))
  H.eq("and moves it to the cursor", rest and { rest.row, rest.col }, { 8, 11 })
end
input("<Esc>")

-- 5c. Cycling through several suggestions (the fake server offers two).
if exact then
  wait(500, function() return lua("return T.state()").mode == "n" end)
  local two = vim.deepcopy(before_lines)
  two[1] = "import math  # two"
  lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", two)
  lua("vim.api.nvim_win_set_cursor(0, {9, 0})")
  input("i    return")
  g = nil
  wait(10000, function()
    g = lua("return T.ghost()")
    return g ~= nil
  end)
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
if exact then
  lua("require('rotary').configure({ maxTokens = 7 })")
  local got
  wait(3000, function()
    local s = lua("return T.stats()")
    got = s.settings and s.settings.rotary and s.settings.rotary.maxTokens
    return got == 7
  end)
  H.eq("configure() sends didChangeConfiguration {settings={rotary=...}}", got, 7)
  H.eq("initializationOptions is the settings tree", lua("return T.stats()").initializationOptions.maxTokens, 64)
  lua("_G.notes = {}")
  lua("vim.cmd('Rotary toggle')")
  H.check(":Rotary toggle uses rotary.toggle", wait(3000, function()
    local notes = lua("return _G.notes")
    return notes[1] == "Rotary completions disabled"
  end), vim.inspect(lua("return _G.notes")))
  lua("vim.cmd('Rotary toggle')")
end

-- 7. :checkhealth rotary
lua("vim.cmd('checkhealth rotary')")
local health = table.concat(lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)"), "\n")
io.stdout:write("# " .. health:gsub("\n", "\n# ") .. "\n")
H.check(":checkhealth rotary finds the server", health:match("OK[^\n]*[Ss]erver") ~= nil, health)
H.check(":checkhealth rotary reports no errors", health:match("ERROR") == nil, health)

finish()
