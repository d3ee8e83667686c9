-- Pure text helpers for ghost text: no Neovim API here, so they are unit-tested headless
-- (editors/nvim/tests/unit.lua). Positions are 0-based (row, byte column).
local M = {}

-- A "word" byte: ASCII alphanumerics, underscore, and every byte of a multi-byte UTF-8
-- character (so non-ASCII identifiers count as words and are never cut in half).
local WORD = "[%w_\128-\255]"

--- The part of `insert_text` still to show, given what is already in the buffer between
--- the start of the item's range and the cursor (`typed`). nil when the buffer has
--- diverged from the suggestion (the suggestion no longer applies).
---@param insert_text string
---@param typed string
---@return string|nil
function M.remaining(insert_text, typed)
  if typed == "" then
    return insert_text
  end
  if insert_text:sub(1, #typed) == typed then
    return insert_text:sub(#typed + 1)
  end
  return nil
end

--- The next word of a suggestion, as "accept word" takes it: leading whitespace (new
--- lines and indentation included), then one run of word bytes, or else one run of
--- other non-space bytes. Returns the whole text when it is only whitespace.
---@param text string
---@return string
function M.next_word(text)
  local lead = text:match("^%s*")
  local rest = text:sub(#lead + 1)
  if rest == "" then
    return text
  end
  local word = rest:match("^" .. WORD .. "+") or rest:match("^[^%s%w_\128-\255]+")
  return lead .. word
end

--- The next line of a suggestion, as "accept line" takes it: the text up to (not
--- including) the first newline; when the text starts with a newline, that newline and
--- the following line's text. Repeated accepts walk the suggestion line by line.
---@param text string
---@return string
function M.next_line(text)
  local first = text:match("^[^\n]*")
  if first ~= "" then
    return first
  end
  local second = text:match("^\n[^\n]*")
  return second or text
end

--- Split text into its first line and the list of following lines.
---@param text string
---@return string first, string[] rest
function M.split_lines(text)
  local lines = {}
  for line in (text .. "\n"):gmatch("(.-)\n") do
    lines[#lines + 1] = line
  end
  local first = table.remove(lines, 1)
  return first, lines
end

--- Where the cursor lands after inserting `text` at (row, col).
---@return integer row, integer col
function M.end_position(row, col, text)
  local first, rest = M.split_lines(text)
  if #rest == 0 then
    return row, col + #first
  end
  return row + #rest, #rest[#rest]
end

--- Number of characters (Unicode code points) of a UTF-8 string: the unit of the
--- `length`/`acceptedLength` the server counts (Python's len()).
---@param text string
---@return integer
function M.char_count(text)
  local _, continuation = text:gsub("[\128-\191]", "")
  return #text - continuation
end

return M
