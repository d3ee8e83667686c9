-- Drives a second Neovim (`nvim --embed --headless`) over RPC for the end-to-end tests, so
-- keys go through the child's ordinary input loop exactly as typed by a user: insert mode,
-- TextChangedI/CursorMovedI, mappings, 'indentexpr'. The child loads the plugin and starts
-- the server; every inline-completion reply the server sends is recorded in the child, so a
-- test compares what the editor shows and inserts with the server's own answer.
--
--   local C = dofile(".../child.lua")
--   local child = C.start({ cmd = {...}, plugin = H.plugin_dir(), cwd = dir, ftplugin = true })
--   child.lua("return T.ghost()"); child.input("i    return"); child.wait(ms, fn); child.stop()
local C = {}

-- Helpers evaluated in the child (global T).
local CHILD_HELPERS = [[
  local ghost = require("rotary.ghost")
  local text = require("rotary.text")
  _G.T = { replies = {} }

  local function client(bufnr)
    return vim.lsp.get_clients({ name = "rotary", bufnr = bufnr })[1]
  end

  -- Record every textDocument/inlineCompletion reply the plugin receives, with its request.
  vim.api.nvim_create_autocmd("LspAttach", {
    callback = function(ev)
      local c = vim.lsp.get_client_by_id(ev.data.client_id)
      if not c or c.name ~= "rotary" or c._rotary_test_recorded then return end
      c._rotary_test_recorded = true
      local request = c.request
      c.request = function(self, method, params, handler, bufnr)
        if method == "textDocument/inlineCompletion" and type(handler) == "function" then
          local inner = handler
          local sent = vim.deepcopy(params)
          handler = function(err, result, ctx, conf)
            local items = type(result) == "table" and (result.items or result) or {}
            table.insert(T.replies, { position = sent.position, uri = sent.textDocument.uri, err = err,
                                      items = items, encoding = self.offset_encoding })
            return inner(err, result, ctx, conf)
          end
        end
        return request(self, method, params, handler, bufnr)
      end
    end,
  })

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

  local function item_text(item)
    return type(item.insertText) == "table" and item.insertText.value or item.insertText
  end

  -- The server's reply that the ghost text at the cursor comes from: the newest recorded
  -- answer with an item for the cursor's position. Returns
  -- { insert = insertText, range = {sr, sc, er, ec} in buffer bytes, after = lines once
  --   the item is applied, shows = what must still appear at the cursor }, or nil.
  function T.reply()
    local c = client(0)
    local cur = vim.api.nvim_win_get_cursor(0)
    local row = cur[1] - 1
    local line = vim.api.nvim_get_current_line()
    local uri = vim.uri_from_bufnr(0)
    for i = #T.replies, 1, -1 do
      local r = T.replies[i]
      local enc = r.encoding or (c and c.offset_encoding) or "utf-16"
      if r.uri == uri and r.position.line == row and #r.items > 0
        and vim.str_byteindex(line, enc, r.position.character, false) == cur[2] then
        local item = r.items[1]
        local range = item.range or { start = r.position, ["end"] = r.position }
        local function byte(pos)
          local l = vim.api.nvim_buf_get_lines(0, pos.line, pos.line + 1, false)[1] or ""
          return vim.str_byteindex(l, enc, pos.character, false)
        end
        local sr, sc, er, ec = range.start.line, byte(range.start), range["end"].line, byte(range["end"])
        local insert = item_text(item)
        -- The buffer once the item's range is replaced by its text: what accepting means.
        local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
        local head = lines[sr + 1]:sub(1, sc)
        local tail = lines[er + 1]:sub(ec + 1)
        local new = vim.split(head .. insert .. tail, "\n", { plain = true })
        local after = {}
        for j = 1, sr do after[#after + 1] = lines[j] end
        vim.list_extend(after, new)
        for j = er + 2, #lines do after[#after + 1] = lines[j] end
        local typed = table.concat(vim.api.nvim_buf_get_text(0, sr, sc, row, cur[2], {}), "\n")
        return { insert = insert, range = { sr, sc, er, ec }, after = after,
                 shows = text.remaining(insert, typed), count = #r.items }
      end
    end
    return nil
  end

  -- rotary.stats as the server answers it.
  function T.stats()
    local c = client()
    local res = c:request_sync("workspace/executeCommand", { command = "rotary.stats" }, 10000, 0)
    return res and res.result
  end
  function T.lines() return vim.api.nvim_buf_get_lines(0, 0, -1, false) end
  function T.state()
    return { mode = vim.api.nvim_get_mode().mode, cursor = vim.api.nvim_win_get_cursor(0), tick = vim.b.changedtick }
  end
]]

---@param opts {cmd: string[], plugin: string, cwd: string, ftplugin: boolean|nil, setup: table|nil}
function C.start(opts)
  local job = vim.fn.jobstart({ vim.v.progpath, "--embed", "--headless", "-u", "NONE", "-i", "NONE", "-n" }, {
    rpc = true,
    cwd = opts.cwd,
  })
  assert(job > 0, "could not start the child nvim")
  local child = {}
  function child.lua(code, ...)
    local result = vim.rpcrequest(job, "nvim_exec_lua", code, { ... })
    if result == vim.NIL then
      return nil
    end
    return result
  end
  function child.input(keys)
    vim.rpcrequest(job, "nvim_input", keys)
  end
  -- Wait until fn() is true (polled every 20 ms); returns whether it became true.
  function child.wait(ms, fn)
    return vim.wait(ms, function()
      return fn()
    end, 20)
  end
  -- Wait for ghost text at the cursor; returns it or nil.
  function child.ghost(ms)
    local g
    child.wait(ms, function()
      g = child.lua("return T.ghost()")
      return g ~= nil
    end)
    return g
  end
  function child.stop()
    pcall(child.lua, "for _, c in ipairs(vim.lsp.get_clients({name='rotary'})) do c:stop(true) end")
    vim.wait(300)
    pcall(vim.fn.jobstop, job)
  end

  -- Filetype detection, and with ftplugin the editor's own Python indentation
  -- (indent/python.vim: 4 more after a line ending in ":") and options (expandtab, sts=4).
  child.lua([[
    local plugin, cmd, ftplugin, setup = ...
    vim.opt.rtp:prepend(plugin)
    vim.o.swapfile = false
    vim.o.shortmess = vim.o.shortmess .. "I"
    vim.cmd(ftplugin and "filetype plugin indent on" or "filetype on")
    _G.notes = {}
    vim.notify = function(msg, level) table.insert(_G.notes, msg) end
    require("rotary").setup(vim.tbl_deep_extend("force",
      { cmd = cmd, filetypes = { "python" }, ghost_text = { debounce_ms = 10 } }, setup or {}))
  ]], opts.plugin, opts.cmd, opts.ftplugin or false, opts.setup or vim.empty_dict())
  child.lua(CHILD_HELPERS)
  return child
end

--- Open `file` in the child and wait for the server to attach and initialize.
function C.open(child, file, timeout_ms)
  child.lua("vim.cmd.edit(...)", file)
  return child.wait(timeout_ms or 20000, function()
    return child.lua("return #vim.lsp.get_clients({ name = 'rotary', bufnr = 0 }) == 1"
      .. " and vim.lsp.get_clients({ name = 'rotary' })[1].initialized == true")
  end)
end

return C
