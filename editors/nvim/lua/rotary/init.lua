-- Rotary for Neovim: starts `rotary lsp`, shows its inline completions as ghost text.
-- All completion logic lives in the server; this plugin is UI.
--   require("rotary").setup({ ... })   -- options: lua/rotary/config.lua (commented defaults)
local M = {}

local function renderer()
  if require("rotary.native").use() then
    return require("rotary.native")
  end
  return require("rotary.ghost")
end

local function buf(bufnr)
  return (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
end

--- Accept the whole suggestion; false when none is shown.
function M.accept(bufnr) return renderer().accept(buf(bufnr)) end
--- Accept the suggestion's next word.
function M.accept_word(bufnr) return renderer().accept_word(buf(bufnr)) end
--- Accept the suggestion's next line.
function M.accept_line(bufnr) return renderer().accept_line(buf(bufnr)) end
--- Show the next (1) or previous (-1) of several suggestions.
function M.cycle(bufnr, count) return renderer().cycle(buf(bufnr), count or 1) end
--- Ask for a suggestion now.
function M.trigger(bufnr) return renderer().request(buf(bufnr), 1) end

-- The server became ready (model loaded, or re-enabled): suggest at the cursor when typing.
function M.on_ready()
  local bufnr = vim.api.nvim_get_current_buf()
  local config = require("rotary.config")
  if config.options.ghost_text.auto_trigger and vim.api.nvim_get_mode().mode:match("^i")
    and require("rotary.client").get(bufnr) and not require("rotary.ghost").visible(bufnr) then
    renderer().request(bufnr, 2)
  end
end

--- Hide the suggestion; false when none was shown.
function M.dismiss(bufnr)
  bufnr = buf(bufnr)
  local ghost = require("rotary.ghost")
  local shown = ghost.visible(bufnr)
  renderer().dismiss(bufnr)
  return shown
end

--- Change server settings at run time (sent by workspace/didChangeConfiguration).
---@param settings table keys of config.defaults.settings
function M.configure(settings) require("rotary.client").configure(settings) end

--- "Rotary: 230 ms", "Rotary: no suggestion", "Rotary: loading (40%)", ...; "" when not attached.
--- Redraw on `User RotaryStatus`.
function M.statusline(bufnr) return require("rotary.client").statusline(bufnr) end

---@param opts table|nil see lua/rotary/config.lua
function M.setup(opts)
  local config = require("rotary.config")
  local client = require("rotary.client")
  config.setup(opts)
  vim.api.nvim_set_hl(0, config.options.ghost_text.hl_group, { link = "Comment", default = true })
  require("rotary.commands").create()
  client.track_progress()
  local group = vim.api.nvim_create_augroup("rotary", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    callback = function(ev)
      if client.wants(ev.buf) then
        client.start(ev.buf)
      end
    end,
  })
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(b) and vim.bo[b].filetype ~= "" and client.wants(b) then
      client.start(b)
    end
  end
end

return M
