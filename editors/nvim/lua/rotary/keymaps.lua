-- Buffer-local insert-mode keys. Each calls require("rotary") so a user who maps keys
-- themselves (keymaps.* = false) gets exactly the same behaviour.
local config = require("rotary.config")

local M = {}

local function map(bufnr, lhs, desc, fn, fallback)
  if not lhs or lhs == "" then
    return
  end
  vim.keymap.set("i", lhs, function()
    if not fn() and fallback then
      -- Nothing to accept: the key does what it does without Rotary.
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(lhs, true, false, true), "n", false)
    end
  end, { buffer = bufnr, silent = true, desc = desc })
end

function M.attach(bufnr)
  local keys = config.options.keymaps
  local rotary = require("rotary")
  map(bufnr, keys.accept, "Rotary: accept suggestion", function() return rotary.accept(bufnr) end, true)
  map(bufnr, keys.accept_word, "Rotary: accept next word", function() return rotary.accept_word(bufnr) end, true)
  map(bufnr, keys.accept_line, "Rotary: accept next line", function() return rotary.accept_line(bufnr) end, true)
  map(bufnr, keys.next, "Rotary: next suggestion", function() return rotary.cycle(bufnr, 1) end, false)
  map(bufnr, keys.prev, "Rotary: previous suggestion", function() return rotary.cycle(bufnr, -1) end, false)
  map(bufnr, keys.trigger, "Rotary: suggest now", function() rotary.trigger(bufnr) return true end, false)
  map(bufnr, keys.dismiss, "Rotary: dismiss suggestion", function() return rotary.dismiss(bufnr) end, true)
end

return M
