-- :checkhealth rotary — server executable found, server answering, worker reachable,
-- model loaded. The last two come from the server's own `rotary.stats`.
local M = {}

local function start_temporary(config)
  local client_mod = require("rotary.client")
  local conf = {
    name = client_mod.NAME .. "-health",
    cmd = config.options.cmd,
    root_dir = (vim.uv or vim.loop).cwd(),
    init_options = vim.deepcopy(config.options.settings),
  }
  local id
  if vim.fn.has("nvim-0.11") == 1 then
    id = vim.lsp.start(conf, { attach = false })
  else
    id = vim.lsp.start_client(conf)
  end
  local client = id and vim.lsp.get_client_by_id(id)
  if client then
    vim.wait(15000, function()
      return client.initialized == true
    end, 50)
  end
  return client
end

-- Look a value up under any of several paths ("a.b"), for stats whose layout may grow.
local function lookup(tbl, paths)
  for _, path in ipairs(paths) do
    local v = tbl
    for key in path:gmatch("[^.]+") do
      v = type(v) == "table" and v[key] or nil
    end
    if v ~= nil and v ~= vim.NIL then
      return v, path
    end
  end
end

function M.check()
  local health = vim.health
  local config = require("rotary.config")
  local client_mod = require("rotary.client")

  health.start("rotary: editor")
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok(("Neovim %s"):format(tostring(vim.version())))
  else
    health.error("Neovim 0.10 or newer is needed (extmarks with inline virtual text)")
  end
  if require("rotary.native").use() then
    health.ok("ghost text: vim.lsp.inline_completion (Neovim 0.12+)")
  else
    health.ok("ghost text: Rotary's extmark renderer")
  end

  health.start("rotary: server")
  local cmd = config.options.cmd
  local exe = vim.fn.exepath(cmd[1])
  if exe == "" then
    health.error(("server executable %q not found"):format(cmd[1]), {
      "Install Rotary (see the README) and put its `rotary` on $PATH,",
      "or pass the full path: require('rotary').setup({ cmd = { '/path/to/.venv/bin/rotary', 'lsp' } })",
    })
    return
  end
  health.ok(("server executable: %s (cmd: %s)"):format(exe, table.concat(cmd, " ")))

  local client = client_mod.get()
  local temporary = false
  if client then
    health.ok(("server running (client id %d)"):format(client.id))
  else
    client = start_temporary(config)
    temporary = client ~= nil
    if not client or not client.initialized then
      health.error("the server did not start or did not answer `initialize` within 15 s")
      if client then
        client_mod.request(client, "shutdown", nil, function() end)
      end
      return
    end
    health.info("no buffer is attached: checked with a temporary server")
  end

  local commands = client_mod.server_commands(client)
  health.info("server commands: " .. table.concat(commands, ", "))
  if not vim.tbl_contains(commands, "rotary.stats") then
    health.warn("the server does not offer rotary.stats: cannot check the worker and model")
  else
    local res = client_mod.request_sync(client, "workspace/executeCommand", { command = "rotary.stats" }, 15000)
    local stats = res and res.result
    if not res or res.err or type(stats) ~= "table" then
      health.error("rotary.stats failed: " .. vim.inspect(res and res.err or "timeout"))
    else
      local state = lookup(stats, { "worker.state", "workerState", "state" })
      local reachable = lookup(stats, { "worker.reachable", "workerReachable" })
      if reachable == nil and state ~= nil then
        reachable = state == "ready" or state == "loading"
      end
      local address = lookup(stats, { "worker.address", "daemon.settings.workerAddress", "workerAddress" })
      if address == nil or address == "" then
        address = "local worker"
      end
      local worker_log = lookup(stats, { "worker.log" })
      if reachable then
        health.ok(("worker reachable (%s%s)"):format(address, state and (", " .. state) or ""))
      elseif state == nil and reachable == nil then
        health.warn("rotary.stats says nothing about the worker: " .. vim.inspect(stats))
      else
        health.error(("worker not reachable (%s, state %s)"):format(address, tostring(state)), {
          "Check settings.workerAddress" .. (worker_log and worker_log ~= "" and (", and the worker log: " .. worker_log) or "."),
        })
      end
      local loaded = lookup(stats, { "worker.modelLoaded", "modelLoaded", "model.loaded" })
      local model = lookup(stats, { "worker.model", "model.name", "model" })
      if model == nil or model == "" then
        model = lookup(stats, { "worker.message" })
      end
      if loaded == nil and state ~= nil then
        loaded = state == "ready"
      end
      if loaded then
        health.ok("model loaded" .. (type(model) == "string" and model ~= "" and (": " .. model) or ""))
      elseif state == "loading" then
        health.warn("model still loading (the first completion waits for it)")
      else
        health.error("model not loaded" .. (state and (" (worker state: " .. tostring(state) .. ")") or ""))
      end
    end
  end
  if temporary then
    if vim.fn.has("nvim-0.11") == 1 then
      client:stop(true)
    else
      client.stop(true)
    end
  end
end

return M
