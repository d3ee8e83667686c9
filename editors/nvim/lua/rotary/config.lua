-- Rotary's options: the commented defaults, and the merge with what setup() gets.
local M = {}

---@class rotary.Config
M.defaults = {
  -- Command that starts the language server over stdio.
  -- Default: `rotary lsp` from $PATH (the README's `make install` puts it in .venv/bin).
  cmd = { "rotary", "lsp" },

  -- Filetypes whose buffers attach to Rotary. "*" attaches every normal file buffer.
  filetypes = {
    "python", "lua", "javascript", "javascriptreact", "typescript", "typescriptreact",
    "go", "rust", "c", "cpp", "java", "sh", "ruby", "php", "html", "css", "markdown",
  },

  -- Files that mark a project root; one server is shared per root. Without a marker
  -- the file's directory is the root.
  root_markers = { ".git", "pyproject.toml", "package.json", "Cargo.toml", "go.mod", "Makefile" },

  -- Server settings: the typed tree of section "rotary", sent as initializationOptions
  -- and, when changed through require("rotary").configure{...}, by
  -- workspace/didChangeConfiguration (no restart). Same keys and defaults as the server.
  settings = {
    enabled = true,          -- completions on or off (the server answers nothing when off)
    workerAddress = "",      -- "" = the server starts its own local worker; else host:port of a shared one
    model = "",              -- "" = the embedded default (SmolLM2-135M); else a local HF model dir or a .gguf path
    maxTokens = 64,          -- longest suggestion, in tokens
    completionMode = "auto", -- "auto" | "singleLine" | "multiLine"
    debounceMs = 50,         -- the server waits this long for more keystrokes before generating
    editAwareCache = true,   -- reuse the KV cache across edits (re-rotating shifted keys)
    abstainThreshold = -1,   -- no suggestion when it is likely wrong: -1 = calibrated threshold, 0 = never abstain
    decodingMode = "lossless", -- "lossless" (verified n-gram guesses) | "earlyExit" (lossy, fewer layers) | "plain"
    exitThreshold = -1,      -- earlyExit's threshold: -1 = calibrated; higher = fewer exits, closer to the full model
  },

  ghost_text = {
    -- Request suggestions while typing and on entering insert mode (so a line opened with
    -- `o` gets one at its indentation). When false, only keymaps.trigger asks for one.
    auto_trigger = true,
    -- Client-side wait after a keystroke before sending a request; the server debounces
    -- too (settings.debounceMs), this only keeps the request count down while typing fast.
    debounce_ms = 20,
    -- Highlight group of the ghost text (linked to Comment unless you define it).
    hl_group = "RotaryGhostText",
    -- Neovim 0.12+ has vim.lsp.inline_completion; nil = use it there, false = always use
    -- Rotary's own extmark renderer (the one used on 0.10/0.11).
    native = nil,
  },

  -- Insert-mode keys; false disables one. accept falls back to the key itself when no
  -- suggestion is shown, so <Tab> still indents.
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    next = "<M-]>",           -- cycle when the server offers several suggestions
    prev = "<M-[>",
    trigger = "<M-\\>",       -- ask for a suggestion now
    dismiss = "<C-]>",
  },

  -- Log level of the plugin's own messages (vim.log.levels).
  log_level = vim.log.levels.WARN,
}

---@type rotary.Config
M.options = vim.deepcopy(M.defaults)

---@param opts table|nil
---@return rotary.Config
function M.setup(opts)
  opts = opts or {}
  -- Lists replace rather than merge (a user's filetypes are the whole list).
  local options = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  for _, key in ipairs({ "cmd", "filetypes", "root_markers" }) do
    if opts[key] ~= nil then
      options[key] = opts[key]
    end
  end
  if type(options.cmd) == "string" then
    options.cmd = { options.cmd, "lsp" }
  end
  M.options = options
  return options
end

return M
