;;; test-eglot.el --- batch test: Emacs + eglot get a completion from Rotary  -*- lexical-binding: t -*-
;;
;; Usage (Debian: apt-get install emacs-nox elpa-eglot):
;;   ROTARY_TEST_CMD='["rotary","lsp"]' emacs --batch -Q -l editors/emacs/test-eglot.el
;;
;; Connects eglot to the server command, opens a Python buffer, asks for completions
;; through eglot's completion-at-point (textDocument/completion) until the model has
;; loaded, inserts the first candidate with `completion-at-point', and checks the
;; buffer.  Also runs rotary.stats through workspace/executeCommand.  Exits 0 on success.
;;
;; ROTARY_TEST_TIMEOUT: seconds to wait for a non-empty answer (the model loads) [240].
;; ROTARY_TEST_EXPECT: JSON string, the suggestion the server must give (tests/editors/test_emacs.py
;; computes it for the real server); when set, the buffer must be exactly the text before plus it.

(require 'package)
;; Debian's elpa-* packages live here; -Q does not look there by itself.
(add-to-list 'package-directory-list "/usr/share/emacs/site-lisp/elpa")
(package-initialize)
(require 'eglot)
(require 'python)
(require 'json)

(defvar rotary-test-failed nil)
(defun rotary-test-check (name ok &optional detail)
  (princ (format "%s - %s%s\n" (if ok "ok" "not ok") name
                 (if (and detail (not ok)) (format ": %s" detail) "")))
  (unless ok (setq rotary-test-failed t))
  ok)
(defun rotary-test-finish ()
  (ignore-errors (eglot-shutdown (eglot-current-server)))
  (kill-emacs (if rotary-test-failed 1 0)))

(let* ((cmd (append (json-parse-string (or (getenv "ROTARY_TEST_CMD") (error "set ROTARY_TEST_CMD"))
                                       :array-type 'list)
                    ;; initializationOptions is the "rotary" settings tree itself.
                    '(:initializationOptions (:maxTokens 32 :completionMode "singleLine"))))
       (timeout (string-to-number (or (getenv "ROTARY_TEST_TIMEOUT") "240")))
       (expect (and (getenv "ROTARY_TEST_EXPECT") (json-parse-string (getenv "ROTARY_TEST_EXPECT"))))
       (dir (make-temp-file "rotary-emacs" t))
       (file (expand-file-name "shapes.py" dir))
       (eglot-sync-connect 30)
       (eglot-connect-timeout 60)
       ;; Sent by workspace/didChangeConfiguration as {"settings": {"rotary": {...}}}.
       (eglot-workspace-configuration '(:rotary (:debounceMs 10))))
  (setq eglot-server-programs (list (cons 'python-mode cmd)))
  (with-temp-file file
    (insert "import math\n\n\ndef add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return"))
  (find-file file)
  (python-mode)
  (goto-char (point-max))
  ;; eglot-ensure waits for an idle moment that batch mode never has: connect directly.
  (apply #'eglot (eglot--guess-contact))
  (let ((server (eglot-current-server)))
    (unless (rotary-test-check "eglot connects to the server" (and server (jsonrpc-running-p server)))
      (rotary-test-finish))
    (rotary-test-check "the server is rotary"
                       (equal (plist-get (eglot--server-info server) :name) "rotary")
                       (eglot--server-info server))
    (let* ((caps (eglot--capabilities server))
           (commands (append (plist-get (plist-get caps :executeCommandProvider) :commands) nil)))
      (rotary-test-check "completionProvider advertised" (plist-member caps :completionProvider))
      (rotary-test-check "rotary.stats advertised" (member "rotary.stats" commands) commands))
    ;; Ask through eglot's completion-at-point until the model answers.
    (let ((deadline (+ (float-time) timeout))
          (before (buffer-string))
          candidates capf)
      (while (and (null candidates) (< (float-time) deadline))
        (setq capf (eglot-completion-at-point))
        (when capf
          (setq candidates (all-completions (buffer-substring (nth 0 capf) (nth 1 capf)) (nth 2 capf))))
        (unless candidates (sleep-for 2)))
      (unless (rotary-test-check "a completion from Rotary via textDocument/completion" candidates)
        (rotary-test-finish))
      (princ (format "# candidates: %S\n" candidates))
      ;; Insert it the way a user does (one candidate: completion-at-point inserts it).
      (let ((completion-at-point-functions '(eglot-completion-at-point))
            (completion-cycle-threshold t))
        (completion-at-point))
      (rotary-test-check "completion-at-point inserted the candidate"
                         (and (not (equal (buffer-string) before))
                              (string-prefix-p before (buffer-string)))
                         (buffer-string))
      (let ((candidate (substring-no-properties (car candidates))))
        (princ (format "# line after insertion: %S\n"
                       (buffer-substring (line-beginning-position) (line-end-position))))
        (rotary-test-check "the buffer now ends with the server's candidate"
                           (string-suffix-p candidate (buffer-string)) (list (buffer-string) candidate))
        (when expect
          (rotary-test-check "the inserted suggestion is the expected one"
                             (equal (buffer-string) (concat before expect))
                             (list (substring (buffer-string) (length before)) expect)))))
    (let ((stats (jsonrpc-request server :workspace/executeCommand '(:command "rotary.stats"))))
      (rotary-test-check "rotary.stats answers" (and stats (listp stats)) stats))
    (rotary-test-finish)))
