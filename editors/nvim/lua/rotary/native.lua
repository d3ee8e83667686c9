-- Neovim 0.12+: the built-in vim.lsp.inline_completion requests and draws the ghost
-- text; Rotary adds its keys (accept word/line included) and acceptance reports.
-- (Only 0.11 is available to the tests here: this path is written against the 0.12
-- API documentation and falls back to the extmark renderer when that API is missing.)
local client_mod = require("rotary.client")
local config = require("rotary.config")
local text = require("rotary.text")

local M = {}

function M.use()
  if config.options.ghost_text.native == false then
    return false
  end
  local ic = vim.lsp.inline_completion
  return vim.fn.has("nvim-0.12") == 1 and type(ic) == "table" and type(ic.enable) == "function"
    and type(ic.get) == "function"
end

local function item_text(item)
  local t = item.insert_text or item.insertText or item.value
  if type(t) == "table" then
    t = t.value
  end
  return type(t) == "string" and t or ""
end

local function item_id(item)
  local cmd = item.command
  local args = type(cmd) == "table" and cmd.command == "rotary.suggestionAccepted" and cmd.arguments
  return type(args) == "table" and type(args[1]) == "table" and args[1].id or nil
end

-- Start of the item's range as (row, byte col); the cursor when it has none.
local function item_start(bufnr, item, client)
  local r = item.range
  local cursor = vim.api.nvim_win_get_cursor(0)
  if type(r) ~= "table" then
    return cursor[1] - 1, cursor[2]
  end
  if r.start_row then -- vim.Range
    return r.start_row, r.start_col
  end
  if type(r[1]) == "number" then -- { row, col, end_row, end_col }
    return r[1], r[2]
  end
  local start = r.start or r[1]
  if type(start) == "table" and start.row then
    return start.row, start.col
  end
  if type(start) == "table" and start.line then -- lsp.Range
    local line = vim.api.nvim_buf_get_lines(bufnr, start.line, start.line + 1, false)[1] or ""
    return start.line, vim.str_byteindex(line, client and client.offset_encoding or "utf-16", start.character, false)
  end
  return cursor[1] - 1, cursor[2]
end

-- Report "shown" for what the built-in renderer receives: it draws the first item.
local function observe_results(client)
  if client._rotary_observed then
    return
  end
  client._rotary_observed = true
  local request = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method == "textDocument/inlineCompletion" and type(handler) == "function" then
      local inner = handler
      handler = function(err, result, ctx, conf)
        local items = result and (result.items or result)
        local item = type(items) == "table" and items[1]
        if not err and type(item) == "table" and item_id(item) then
          client_mod.execute("rotary.suggestionShown",
            { { id = item_id(item), length = text.char_count(item_text(item)) } }, nil, bufnr)
        end
        return inner(err, result, ctx, conf)
      end
    end
    return request(self, method, params, handler, bufnr)
  end
end

function M.attach(client, bufnr)
  observe_results(client)
  vim.lsp.inline_completion.enable(true, { bufnr = bufnr, client_id = client.id })
  require("rotary.keymaps").attach(bufnr)
end

function M.accept(bufnr)
  return vim.lsp.inline_completion.get({ bufnr = bufnr }) and true or false
end

local function accept_part(bufnr, splitter)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local accepted = false
  vim.lsp.inline_completion.get({
    bufnr = bufnr,
    on_accept = function(item)
      local client = vim.lsp.get_client_by_id(item.client_id)
      local cursor = vim.api.nvim_win_get_cursor(0)
      local row, col = cursor[1] - 1, cursor[2]
      local sr, sc = item_start(bufnr, item, client)
      local typed = table.concat(vim.api.nvim_buf_get_text(bufnr, sr, sc, row, col, {}), "\n")
      local visible = text.remaining(item_text(item), typed)
      if not visible or visible == "" then
        return
      end
      local part = splitter(visible)
      local first, rest = text.split_lines(part)
      local lines = { first }
      vim.list_extend(lines, rest)
      vim.api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
      local er, ec = text.end_position(row, col, part)
      vim.api.nvim_win_set_cursor(0, { er + 1, ec })
      accepted = true
      local id = item_id(item)
      if id then
        local full = part == visible
        client_mod.execute("rotary.suggestionAccepted",
          { { id = id, acceptedLength = text.char_count(part), full = full } }, nil, bufnr)
      end
    end,
  })
  return accepted
end

function M.accept_word(bufnr)
  return accept_part(bufnr, text.next_word)
end

function M.accept_line(bufnr)
  return accept_part(bufnr, text.next_line)
end

function M.cycle(bufnr, count)
  local ic = vim.lsp.inline_completion
  local select = ic.select or ic.jump -- named jump before the 0.12 release
  if type(select) ~= "function" then
    return false
  end
  select({ bufnr = bufnr, count = count })
  return true
end

function M.dismiss(_) end

function M.request(_) end

return M
