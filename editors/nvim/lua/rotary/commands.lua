-- :Rotary status | toggle | restart | <any command the server advertises> [json args...]
local client_mod = require("rotary.client")

local M = {}

local BUILTIN = { "status", "toggle", "restart" }

local function show(title, value)
  local body = type(value) == "table" and vim.inspect(value) or tostring(value)
  vim.notify(("Rotary %s:\n%s"):format(title, body), vim.log.levels.INFO)
end

local function status()
  local client = client_mod.get()
  local s = client_mod.status
  local lines = {
    client and ("server: running (client %d, %s)"):format(client.id, table.concat(client.config.cmd, " "))
      or "server: not running",
    ("state: %s%s"):format(s.state or "unknown", s.message ~= "" and (" (" .. s.message .. ")") or ""),
    ("last result: %s, latency: %s"):format(s.lastResult or "-", s.latencyMs and (s.latencyMs .. " ms") or "-"),
  }
  if s.progress then
    lines[#lines + 1] = "progress: " .. s.progress
  end
  if client then
    lines[#lines + 1] = "server commands: " .. table.concat(client_mod.server_commands(client), ", ")
  end
  vim.notify(table.concat(lines, "\n"), vim.log.levels.INFO)
end

local function resolve(name)
  local commands = client_mod.server_commands()
  if vim.tbl_contains(commands, name) then
    return name
  end
  if vim.tbl_contains(commands, "rotary." .. name) then
    return "rotary." .. name
  end
end

local function run_server_command(command, raw_args)
  local args = {}
  for _, raw in ipairs(raw_args) do
    local ok, value = pcall(vim.json.decode, raw)
    args[#args + 1] = ok and value or raw
  end
  client_mod.execute(command, #args > 0 and args or nil, function(err, result)
    if err then
      vim.notify(("Rotary %s failed: %s"):format(command, err.message or vim.inspect(err)), vim.log.levels.ERROR)
    else
      show(command, result == nil and "done" or result)
    end
  end)
end

local function toggle()
  if resolve("rotary.toggle") then
    client_mod.execute("rotary.toggle", nil, function(err, result)
      if err then
        vim.notify("Rotary toggle failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
      else
        local enabled = type(result) == "table" and result.enabled
        vim.notify("Rotary completions " .. (enabled and "enabled" or "disabled"), vim.log.levels.INFO)
      end
    end)
  else
    local enabled = not require("rotary.config").options.settings.enabled
    client_mod.configure({ enabled = enabled })
    vim.notify("Rotary completions " .. (enabled and "enabled" or "disabled"), vim.log.levels.INFO)
  end
end

function M.run(fargs)
  local sub = fargs[1] or "status"
  local rest = vim.list_slice(fargs, 2)
  if sub == "status" then
    return status()
  elseif sub == "toggle" then
    return toggle()
  elseif sub == "restart" then
    return client_mod.restart()
  end
  local command = resolve(sub)
  if not command then
    vim.notify(("Rotary: unknown command %q (the server offers: %s)"):format(sub,
      table.concat(client_mod.server_commands(), ", ")), vim.log.levels.ERROR)
    return
  end
  run_server_command(command, rest)
end

function M.complete(arglead, cmdline)
  if #vim.split(cmdline, "%s+", { trimempty = false }) > 2 then
    return {}
  end
  local names = vim.list_extend(vim.deepcopy(BUILTIN), client_mod.server_commands())
  return vim.tbl_filter(function(n)
    return vim.startswith(n, arglead)
  end, names)
end

function M.create()
  vim.api.nvim_create_user_command("Rotary", function(cmd)
    M.run(cmd.fargs)
  end, {
    nargs = "*",
    complete = M.complete,
    desc = "Rotary: status | toggle | restart | <server command> [json args]",
  })
end

return M
