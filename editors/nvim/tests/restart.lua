-- :Rotary restart: the server is stopped and a new one started for the buffer, which answers.
--   ROTARY_TEST_CMD='["rotary","lsp"]' nvim --headless -u NONE -l editors/nvim/tests/restart.lua
--
-- The child Neovim (child.lua) opens a Python file; its rotary client answers a completion
-- (ghost text). `:Rotary restart` must stop that client's server, attach a new client (another
-- id, another server process) to the buffer, and the new server must answer the next completion
-- with ghost text of its own.
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
local file = workdir .. "/restart.py"
vim.fn.writefile({ "def add(a, b):", "" }, file)

local child = C.start({ cmd = cmd, plugin = H.plugin_dir(), cwd = workdir })
local lua, input, wait = child.lua, child.input, child.wait

local function finish()
  child.stop()
  vim.fn.delete(workdir, "rf")
  H.finish()
end

-- The buffer's rotary client: its id and its server's process id.
local function attached()
  return lua([[
    local c = vim.lsp.get_clients({ name = 'rotary', bufnr = 0 })[1]
    if not c or not c.initialized then return nil end
    return { id = c.id, pid = c.rpc and c.rpc.pid or nil }
  ]])
end

-- Type on line 2 in insert mode, from a fresh line, and wait for ghost text.
local function ghost_after_typing(timeout)
  input("<Esc>")
  wait(2000, function() return lua("return T.state()").mode == "n" end)
  lua("vim.api.nvim_buf_set_lines(0, 1, -1, false, { '' })")
  lua("vim.api.nvim_win_set_cursor(0, {2, 0})")
  input("i    return")
  wait(5000, function() return lua("return vim.api.nvim_get_current_line()") == "    return" end)
  return child.ghost(timeout)
end

if not H.check("the plugin starts the server and attaches the Python buffer", C.open(child, file),
  "notes: " .. vim.inspect(lua("return _G.notes"))) then
  return finish()
end
local before = attached()
H.check("the first server answers", ghost_after_typing(first_timeout) ~= nil,
  vim.inspect(lua("return require('rotary.client').status")))

input("<Esc>")
wait(2000, function() return lua("return T.state()").mode == "n" end)
lua("vim.cmd('Rotary restart')")
local after
if not H.check(":Rotary restart attaches a new client to the buffer", wait(20000, function()
  after = attached()
  return after ~= nil and after.id ~= before.id
end), vim.inspect({ before = before, after = after, notes = lua("return _G.notes"), clients = lua([[
  local out = {}
  for _, c in ipairs(vim.lsp.get_clients()) do
    out[#out + 1] = { id = c.id, name = c.name, stopped = c:is_stopped(), buffers = vim.tbl_keys(c.attached_buffers) }
  end
  return out
]]) })) then
  return finish()
end
H.check("the first client is stopped", lua("return vim.lsp.get_client_by_id(...) == nil or vim.lsp.get_client_by_id(...):is_stopped()",
  before.id) == true)
if before.pid and after and after.pid then
  H.check("the new client runs another server process", after.pid ~= before.pid, vim.inspect({ before, after }))
end
H.check("the new server answers", ghost_after_typing(first_timeout) ~= nil,
  vim.inspect(lua("return require('rotary.client').status")))
finish()
