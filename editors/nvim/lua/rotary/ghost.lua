-- Ghost text for Neovim 0.10/0.11: request textDocument/inlineCompletion while typing and
-- draw the suggestion as one extmark (inline virtual text for its first line, virtual
-- lines for the rest). On 0.12+ vim.lsp.inline_completion does this (see native.lua).
-- State is per buffer; the server decides what to suggest, this file only shows it.
local client_mod = require("rotary.client")
local config = require("rotary.config")
local text = require("rotary.text")

local M = {}

M.ns = vim.api.nvim_create_namespace("rotary.ghost")

local uv = vim.uv or vim.loop

---@class rotary.Suggestion
---@field item table        the InlineCompletionItem
---@field client_id integer
---@field row integer       cursor row the ghost text is drawn at (0-based)
---@field col integer       cursor byte column
---@field visible string    text still to insert at the cursor
---@field replace_after integer bytes after the cursor the item's range replaces
---@field changed boolean   typed through or partly accepted since it was shown

---@class rotary.BufState
---@field timer uv_timer_t|nil
---@field seq integer        bumped on every request and dismissal; stale answers are dropped
---@field pending {client: table, id: integer}|nil
---@field items table[]
---@field index integer
---@field suggestion rotary.Suggestion|nil
---@field own_tick integer|nil changedtick after an edit of ours (accept), not a keystroke
---@field shown table<string, boolean> ids already reported as shown

---@type table<integer, rotary.BufState>
local buffers = {}

local function state(bufnr)
  local s = buffers[bufnr]
  if not s then
    s = { seq = 0, items = {}, index = 1, shown = {} }
    buffers[bufnr] = s
  end
  return s
end

local function item_text(item)
  local t = item.insertText
  if type(t) == "table" then
    t = t.value -- a StringValue (snippet): shown and inserted as plain text
  end
  return type(t) == "string" and t or ""
end

local function accept_args(item)
  local cmd = item.command
  if type(cmd) == "table" and cmd.command == "rotary.suggestionAccepted" and type(cmd.arguments) == "table" then
    return cmd.arguments[1]
  end
end

local function item_id(item)
  local args = accept_args(item)
  return type(args) == "table" and args.id or nil
end

--- Clear the ghost text and forget the suggestion (and any pending request).
function M.dismiss(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = buffers[bufnr]
  if not s then
    return
  end
  s.seq = s.seq + 1
  if s.timer then
    s.timer:stop()
  end
  if s.pending then
    pcall(client_mod.cancel_request, s.pending.client, s.pending.id)
    s.pending = nil
  end
  s.suggestion = nil
  s.items = {}
  s.index = 1
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
end

local function render(bufnr, sug)
  vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  local hl = config.options.ghost_text.hl_group
  local first, rest = text.split_lines(sug.visible)
  local opts = { hl_mode = "combine", priority = 1000 }
  if first ~= "" then
    opts.virt_text = { { first, hl } }
    opts.virt_text_pos = "inline"
  end
  if #rest > 0 then
    opts.virt_lines = vim.tbl_map(function(line)
      return { { line, hl } }
    end, rest)
  end
  vim.api.nvim_buf_set_extmark(bufnr, M.ns, sug.row, sug.col, opts)
end

local function report_shown(bufnr, s, item)
  local id = item_id(item)
  if id and not s.shown[id] then
    s.shown[id] = true
    client_mod.execute("rotary.suggestionShown", { { id = id, length = text.char_count(item_text(item)) } }, nil, bufnr)
  end
end

--- Byte position of an LSP position in the buffer.
local function to_byte(bufnr, pos, encoding)
  local line = vim.api.nvim_buf_get_lines(bufnr, pos.line, pos.line + 1, false)[1] or ""
  return pos.line, client_mod.byteindex(line, encoding, pos.character)
end

--- Make a suggestion from an item at the cursor; nil when it does not apply here.
local function suggestion_for(bufnr, item, client, row, col)
  local insert = item_text(item)
  local typed, replace_after = "", 0
  if type(item.range) == "table" then
    local enc = client.offset_encoding or "utf-16"
    local sr, sc = to_byte(bufnr, item.range.start, enc)
    local er, ec = to_byte(bufnr, item.range["end"], enc)
    if sr > row or (sr == row and sc > col) then
      return nil
    end
    typed = table.concat(vim.api.nvim_buf_get_text(bufnr, sr, sc, row, col, {}), "\n")
    if er == row and ec > col then
      replace_after = ec - col
    end
  end
  local visible = text.remaining(insert, typed)
  if not visible or visible == "" then
    return nil
  end
  return {
    item = item, client_id = client.id, row = row, col = col,
    visible = visible, replace_after = replace_after, changed = false,
  }
end

local function show(bufnr, s, client, index)
  local item = s.items[index]
  local cursor = vim.api.nvim_win_get_cursor(0)
  local sug = item and suggestion_for(bufnr, item, client, cursor[1] - 1, cursor[2])
  if not sug then
    M.dismiss(bufnr)
    return false
  end
  s.index = index
  s.suggestion = sug
  render(bufnr, sug)
  report_shown(bufnr, s, item)
  vim.api.nvim_exec_autocmds("User", { pattern = "RotaryGhostText", modeline = false })
  return true
end

--- Ask the server for a suggestion at the cursor now.
---@param trigger_kind integer|nil 1 = invoked (a key), 2 = automatic (typing)
function M.request(bufnr, trigger_kind)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if bufnr ~= vim.api.nvim_get_current_buf() then
    return
  end
  local client = client_mod.get(bufnr)
  if not client then
    return
  end
  local s = state(bufnr)
  M.dismiss(bufnr)
  local seq = s.seq
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local cursor = vim.api.nvim_win_get_cursor(0)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding or "utf-16")
  params.context = { triggerKind = trigger_kind or 2 }
  local ok, id = client_mod.request(client, "textDocument/inlineCompletion", params, function(err, result)
    if s.seq ~= seq then
      return -- dismissed or superseded meanwhile
    end
    s.pending = nil
    if err then
      client_mod.log("inline completion failed: " .. (err.message or vim.inspect(err)), vim.log.levels.DEBUG)
      return
    end
    local now = vim.api.nvim_win_get_cursor(0)
    if vim.api.nvim_get_current_buf() ~= bufnr
      or vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
      or now[1] ~= cursor[1] or now[2] ~= cursor[2]
      or not vim.api.nvim_get_mode().mode:match("^i") then
      return
    end
    local items = result and (result.items or result) or {}
    if type(items) ~= "table" or #items == 0 then
      return
    end
    s.items = items
    show(bufnr, s, client, 1)
  end, bufnr)
  if ok and id then
    s.pending = { client = client, id = id }
  end
end

local function schedule_request(bufnr)
  local s = state(bufnr)
  if not s.timer then
    s.timer = uv.new_timer()
  end
  s.timer:stop()
  local seq = s.seq
  s.timer:start(config.options.ghost_text.debounce_ms, 0, vim.schedule_wrap(function()
    if s.seq == seq and vim.api.nvim_get_mode().mode:match("^i") then
      M.request(bufnr, 2)
    end
  end))
end

---@return boolean whether a suggestion is shown in the buffer
function M.visible(bufnr)
  local s = buffers[bufnr or vim.api.nvim_get_current_buf()]
  return s ~= nil and s.suggestion ~= nil
end

---@return string|nil the text the ghost currently shows (what accept inserts)
function M.current_text(bufnr)
  local s = buffers[bufnr or vim.api.nvim_get_current_buf()]
  return s and s.suggestion and s.suggestion.visible or nil
end

--- Insert `part` (a prefix of the visible text) at the cursor.
local function insert_part(bufnr, s, part, replace_after)
  local sug = s.suggestion
  local first, rest = text.split_lines(part)
  local lines = { first }
  vim.list_extend(lines, rest)
  vim.api.nvim_buf_set_text(bufnr, sug.row, sug.col, sug.row, sug.col + replace_after, lines)
  local row, col = text.end_position(sug.row, sug.col, part)
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
  s.own_tick = vim.api.nvim_buf_get_changedtick(bufnr)
  return row, col
end

--- Accept the whole suggestion. Returns false when none is shown.
function M.accept(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = buffers[bufnr]
  local sug = s and s.suggestion
  if not sug then
    return false
  end
  local item = sug.item
  insert_part(bufnr, s, sug.visible, sug.replace_after)
  local accepted = sug.visible
  local changed = sug.changed
  M.dismiss(bufnr)
  local cmd = item.command
  if type(cmd) == "table" and cmd.command then
    local args = cmd.arguments
    if changed and accept_args(item) then
      -- Part of it was typed or accepted before: report what this accept inserted.
      args = { vim.tbl_extend("force", accept_args(item), { acceptedLength = text.char_count(accepted), full = true }) }
    end
    client_mod.execute(cmd.command, args, nil, bufnr)
  end
  return true
end

local function accept_part(bufnr, splitter)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = buffers[bufnr]
  local sug = s and s.suggestion
  if not sug then
    return false
  end
  local part = splitter(sug.visible)
  if part == sug.visible then
    return M.accept(bufnr)
  end
  local row, col = insert_part(bufnr, s, part, 0)
  sug.row, sug.col = row, col
  sug.visible = sug.visible:sub(#part + 1)
  sug.changed = true
  render(bufnr, sug)
  local id = item_id(sug.item)
  if id then
    client_mod.execute("rotary.suggestionAccepted", { { id = id, acceptedLength = text.char_count(part), full = false } }, nil, bufnr)
  end
  return true
end

function M.accept_word(bufnr)
  return accept_part(bufnr, text.next_word)
end

function M.accept_line(bufnr)
  return accept_part(bufnr, text.next_line)
end

--- Show the next (count 1) or previous (-1) suggestion when the server offered several.
function M.cycle(bufnr, count)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = buffers[bufnr]
  if not s or #s.items < 2 or not s.suggestion then
    return false
  end
  local client = vim.lsp.get_client_by_id(s.suggestion.client_id)
  if not client then
    return false
  end
  local index = (s.index - 1 + count) % #s.items + 1
  return show(bufnr, s, client, index)
end

-- A keystroke changed the text: keep the suggestion if it was typed through, else ask again.
local function on_text_changed(bufnr)
  local s = state(bufnr)
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  if s.own_tick == tick then
    return
  end
  local sug = s.suggestion
  if sug then
    local cursor = vim.api.nvim_win_get_cursor(0)
    local row, col = cursor[1] - 1, cursor[2]
    if row == sug.row and col > sug.col then
      local typed = vim.api.nvim_buf_get_text(bufnr, row, sug.col, row, col, {})[1]
      local rest = text.remaining(sug.visible, typed)
      if rest and rest ~= "" and rest ~= sug.visible then
        sug.col, sug.visible, sug.changed = col, rest, true
        render(bufnr, sug)
        return
      end
    end
  end
  M.dismiss(bufnr)
  if config.options.ghost_text.auto_trigger then
    schedule_request(bufnr)
  end
end

-- Leaving the suggestion's position dismisses it. A keystroke also moves the cursor, and
-- CursorMovedI runs before TextChangedI: check once both ran, when the type-through
-- logic has already moved the suggestion along with the cursor.
local function on_cursor_moved(bufnr)
  local s = buffers[bufnr]
  if not s or not s.suggestion then
    return
  end
  vim.schedule(function()
    local sug = s.suggestion
    if not sug or vim.api.nvim_get_current_buf() ~= bufnr then
      return
    end
    local cursor = vim.api.nvim_win_get_cursor(0)
    if cursor[1] - 1 ~= sug.row or cursor[2] ~= sug.col then
      M.dismiss(bufnr)
    end
  end)
end

--- Attach the renderer to a buffer (called from the client's on_attach).
function M.attach(client, bufnr)
  if require("rotary.native").use() then
    return require("rotary.native").attach(client, bufnr)
  end
  local group = vim.api.nvim_create_augroup("rotary.ghost." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd("TextChangedI", {
    group = group, buffer = bufnr,
    callback = function() on_text_changed(bufnr) end,
  })
  vim.api.nvim_create_autocmd("CursorMovedI", {
    group = group, buffer = bufnr,
    callback = function() on_cursor_moved(bufnr) end,
  })
  -- Entering insert mode asks as typing does: a line opened with `o` (or Enter from
  -- normal mode), already auto-indented, gets a suggestion before the first keystroke.
  vim.api.nvim_create_autocmd("InsertEnter", {
    group = group, buffer = bufnr,
    callback = function()
      if config.options.ghost_text.auto_trigger then
        schedule_request(bufnr)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group, buffer = bufnr,
    callback = function() M.dismiss(bufnr) end,
  })
  vim.api.nvim_create_autocmd({ "BufWipeout", "LspDetach" }, {
    group = group, buffer = bufnr,
    callback = function(ev)
      if ev.event == "LspDetach" and ev.data and ev.data.client_id ~= client.id then
        return
      end
      M.dismiss(bufnr)
      local s = buffers[bufnr]
      if s and s.timer then
        s.timer:close()
      end
      buffers[bufnr] = nil
      pcall(vim.api.nvim_del_augroup_by_id, group)
    end,
  })
  require("rotary.keymaps").attach(bufnr)
end

return M
