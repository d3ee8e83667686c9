-- The language-server client: start or attach `rotary lsp`, push settings, run server
-- commands, and keep the last status the server reported. One client serves the whole
-- Neovim session (each server runs a model worker; one is plenty).
local config = require("rotary.config")

local M = {}

M.NAME = "rotary"

---@class rotary.Status
---@field state string|nil     "loading" | "ready" | "error" | "disabled" (rotary/status)
---@field message string
---@field latencyMs number|nil latency of the last inline completion
---@field lastResult string|nil "suggestion" | "empty"
---@field progress string|nil  the server's $/progress message while a worker loads
M.status = { state = nil, message = "", latencyMs = nil, lastResult = nil, progress = nil }

local has_011 = vim.fn.has("nvim-0.11") == 1

-- Client methods became `client:method()` in 0.11; 0.10 has `client.method()`.
function M.request(client, method, params, handler, bufnr)
  if has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

function M.request_sync(client, method, params, timeout_ms, bufnr)
  if has_011 then
    return client:request_sync(method, params, timeout_ms, bufnr)
  end
  return client.request_sync(method, params, timeout_ms, bufnr)
end

function M.notify(client, method, params)
  if has_011 then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

function M.cancel_request(client, id)
  if has_011 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

--- Byte column of an LSP character offset in `line` (0.11 changed vim.str_byteindex).
function M.byteindex(line, encoding, index)
  local ok, col
  if has_011 then
    ok, col = pcall(vim.str_byteindex, line, encoding, index, false)
  else
    ok, col = pcall(vim.lsp.util._str_byteindex_enc, line, index, encoding)
  end
  if not ok or type(col) ~= "number" then
    return #line
  end
  return math.min(col, #line)
end

local function stop_client(client, force)
  if has_011 then
    return client:stop(force)
  end
  return client.stop(force)
end

local function is_stopped(client)
  if has_011 then
    return client:is_stopped()
  end
  return client.is_stopped()
end

local function log(msg, level)
  level = level or vim.log.levels.INFO
  if level >= config.options.log_level then
    vim.notify("rotary: " .. msg, level)
  end
end
M.log = log

---@param bufnr integer|nil
---@return vim.lsp.Client|nil
function M.get(bufnr)
  return vim.lsp.get_clients({ name = M.NAME, bufnr = bufnr })[1]
end

--- Commands the server advertises (executeCommandProvider); never a list of our own.
---@return string[]
function M.server_commands(client)
  client = client or M.get()
  local provider = client and client.server_capabilities and client.server_capabilities.executeCommandProvider
  return provider and provider.commands or {}
end

local function emit_status()
  vim.api.nvim_exec_autocmds("User", { pattern = "RotaryStatus", modeline = false })
end

local handlers = {
  ["rotary/status"] = function(_, params)
    if type(params) == "table" then
      local was = M.status.state
      M.status.state = params.state
      M.status.message = params.message or ""
      M.status.latencyMs = params.latencyMs ~= vim.NIL and params.latencyMs or nil
      M.status.lastResult = params.lastResult ~= vim.NIL and params.lastResult or nil
      if params.state ~= "loading" then
        M.status.progress = nil
      end
      vim.schedule(emit_status)
      if params.state == "ready" and was ~= "ready" then
        -- Keystrokes while the model loaded got no answer: ask again now that it can.
        vim.schedule(function()
          require("rotary").on_ready()
        end)
      end
    end
  end,
}

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument = caps.textDocument or {}
  -- 0.10/0.11 do not announce inline completion; Rotary's own renderer handles it.
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  return caps
end

local function root_dir(bufnr)
  local name = vim.api.nvim_buf_get_name(bufnr)
  local root = vim.fs.root(bufnr, config.options.root_markers)
  if root then
    return root
  end
  if name ~= "" then
    return vim.fs.dirname(name)
  end
  return (vim.uv or vim.loop).cwd()
end

---@param bufnr integer
---@return boolean
function M.wants(bufnr)
  if not vim.api.nvim_buf_is_valid(bufnr) or vim.bo[bufnr].buftype ~= "" then
    return false
  end
  local fts = config.options.filetypes
  return vim.tbl_contains(fts, "*") or vim.tbl_contains(fts, vim.bo[bufnr].filetype)
end

--- Start the server, or attach the buffer to the running one.
---@param bufnr integer|nil
---@return integer|nil client_id
function M.start(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local opts = config.options
  if vim.fn.executable(opts.cmd[1]) ~= 1 then
    log(("server executable %q not found (set cmd in require('rotary').setup)"):format(opts.cmd[1]), vim.log.levels.ERROR)
    return nil
  end
  return vim.lsp.start({
    name = M.NAME,
    cmd = opts.cmd,
    root_dir = root_dir(bufnr),
    -- initializationOptions is the settings tree itself; settings answer
    -- workspace/configuration and are pushed by didChangeConfiguration after init.
    init_options = vim.deepcopy(opts.settings),
    settings = { rotary = vim.deepcopy(opts.settings) },
    capabilities = capabilities(),
    handlers = handlers,
    on_attach = function(client, buf)
      require("rotary.ghost").attach(client, buf)
    end,
    on_exit = function(code, signal)
      if code ~= 0 and signal ~= 15 then
        M.status.state = "error"
        M.status.message = ("server exited with code %d"):format(code)
        vim.schedule(emit_status)
      end
    end,
  }, {
    bufnr = bufnr,
    reuse_client = function(client)
      -- never the client `:Rotary restart` is stopping: the buffer would be left with no server
      return client.name == M.NAME and not is_stopped(client)
    end,
  })
end

--- Change server settings without a restart (workspace/didChangeConfiguration).
---@param settings table part of the "rotary" settings tree
function M.configure(settings)
  config.options.settings = vim.tbl_deep_extend("force", config.options.settings, settings or {})
  local tree = { rotary = vim.deepcopy(config.options.settings) }
  for _, client in ipairs(vim.lsp.get_clients({ name = M.NAME })) do
    client.settings = tree
    if client.config then
      client.config.settings = tree
    end
    M.notify(client, "workspace/didChangeConfiguration", { settings = tree })
  end
end

--- Run a command the server advertises; handler(err, result) is called on the main loop.
function M.execute(command, arguments, handler, bufnr)
  local client = M.get(bufnr) or M.get()
  if not client then
    if handler then
      handler({ message = "Rotary is not running" }, nil)
    end
    return false
  end
  return M.request(client, "workspace/executeCommand", { command = command, arguments = arguments }, function(err, result)
    if handler then
      handler(err, result)
    end
  end, bufnr)
end

--- Stop the server and start it again for every buffer it served.
function M.restart()
  local clients = vim.lsp.get_clients({ name = M.NAME })
  local buffers = {}
  for _, client in ipairs(clients) do
    for buf in pairs(client.attached_buffers or {}) do
      buffers[#buffers + 1] = buf
    end
    stop_client(client)
  end
  if #buffers == 0 then
    buffers = { vim.api.nvim_get_current_buf() }
  end
  M.status = { state = nil, message = "", latencyMs = nil, lastResult = nil, progress = nil }
  local timer = (vim.uv or vim.loop).new_timer()
  local waited = 0
  timer:start(100, 100, vim.schedule_wrap(function()
    waited = waited + 100
    local alive = vim.tbl_filter(function(c)
      return not is_stopped(c)
    end, clients)
    if #alive > 0 and waited < 5000 then
      return
    end
    for _, c in ipairs(alive) do
      stop_client(c, true)
    end
    timer:stop()
    timer:close()
    for _, buf in ipairs(buffers) do
      if M.wants(buf) then
        M.start(buf)
      end
    end
  end))
end

--- Short text for a statusline: "" when Rotary is not running in this buffer.
---@return string
function M.statusline(bufnr)
  if not M.get(bufnr) then
    return ""
  end
  local s = M.status
  if s.progress then
    return "Rotary: " .. s.progress
  elseif s.state == "loading" or s.state == nil then
    return "Rotary: loading"
  elseif s.state == "error" then
    return "Rotary: error"
  elseif s.state == "disabled" then
    return "Rotary: off"
  elseif s.lastResult == "empty" then
    return "Rotary: no suggestion"
  elseif s.latencyMs then
    return ("Rotary: %d ms"):format(s.latencyMs)
  end
  return "Rotary: ready"
end

-- Keep the server's work-done progress (model loading) for the statusline.
function M.track_progress()
  vim.api.nvim_create_autocmd("LspProgress", {
    group = vim.api.nvim_create_augroup("rotary.progress", { clear = true }),
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      local value = ev.data.params and ev.data.params.value
      if not client or client.name ~= M.NAME or type(value) ~= "table" then
        return
      end
      if value.kind == "end" then
        M.status.progress = nil
      else
        if value.title then
          M.status.progress_title = value.title
        end
        local parts = {}
        for _, p in ipairs({ M.status.progress_title or "loading", value.message or "" }) do
          if p ~= "" then
            parts[#parts + 1] = p
          end
        end
        local text = table.concat(parts, ": ")
        if value.percentage then
          text = ("%s (%d%%)"):format(text, value.percentage)
        end
        M.status.progress = text
      end
      emit_status()
    end,
  })
end

return M
