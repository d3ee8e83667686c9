-- A tiny TAP-like harness for `nvim --headless -u NONE -l`: check(name, cond, detail)
-- prints one line per check; finish() exits non-zero when any check failed.
local H = { failed = 0, passed = 0 }

function H.check(name, cond, detail)
  if cond then
    H.passed = H.passed + 1
    io.stdout:write("ok - " .. name .. "\n")
  else
    H.failed = H.failed + 1
    io.stdout:write("not ok - " .. name .. (detail and (": " .. detail) or "") .. "\n")
  end
  io.stdout:flush()
  return cond
end

function H.eq(name, got, want)
  return H.check(name, vim.deep_equal(got, want), ("got %s, want %s"):format(vim.inspect(got), vim.inspect(want)))
end

function H.finish()
  io.stdout:write(("# %d passed, %d failed\n"):format(H.passed, H.failed))
  io.stdout:flush()
  os.exit(H.failed == 0 and H.passed > 0 and 0 or 1)
end

-- The plugin's lua/ folder (editors/nvim), from this file's path.
function H.plugin_dir()
  local here = debug.getinfo(1, "S").source:sub(2)
  return vim.fs.dirname(vim.fs.dirname(vim.fs.normalize(vim.fn.fnamemodify(here, ":p"))))
end

return H
