//! `tilectl` as a command: shell completions, man pages, version and usage errors.

use std::fs;

use tileflow_tests::{tilectl, tilectl_ok};

#[test]
fn completions_print_a_script_for_each_shell() {
    let state = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F _tilectl"),
        ("zsh", "#compdef tilectl"),
        ("fish", "complete -c tilectl"),
        ("elvish", "edit:completion:arg-completer[tilectl]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let run = tilectl_ok(state.path(), &["completions", shell]);
        assert!(run.stdout.contains(marker), "{shell}:\n{}", run.stdout);
        // Every subcommand and the run flags are completed.
        for word in ["import", "synth", "run", "demo", "expert-slots"] {
            assert!(run.stdout.contains(word), "{shell}: no {word}");
        }
    }
    // The completion command writes nothing into the state directory.
    assert!(fs::read_dir(state.path()).unwrap().next().is_none());

    let run = tilectl(state.path(), &["completions", "tcsh"]);
    assert!(
        !run.ok && run.stderr.contains("invalid value 'tcsh'"),
        "{}",
        run.stderr
    );
}

#[test]
fn man_writes_a_page_per_command() {
    let state = tempfile::tempdir().unwrap();
    let out = state.path().join("share/man/man1");
    tilectl_ok(state.path(), &["man", out.to_str().unwrap()]);
    for page in [
        "tilectl.1",
        "tilectl-model.1",
        "tilectl-model-import.1",
        "tilectl-model-list.1",
        "tilectl-run.1",
        "tilectl-demo.1",
        "tilectl-completions.1",
    ] {
        let text = fs::read_to_string(out.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
        assert!(text.contains(".SH NAME"), "{page}");
    }
    let run = fs::read_to_string(out.join("tilectl-run.1")).unwrap();
    assert!(run.contains("expert\\-slots"), "{run}");

    // Into a path under a regular file: a clear error, no panic.
    let file = state.path().join("file");
    fs::write(&file, b"x").unwrap();
    let bad = file.join("man1");
    let run = tilectl(state.path(), &["man", bad.to_str().unwrap()]);
    assert!(
        !run.ok && !run.stderr.contains("panicked"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("cannot create {}", bad.display())),
        "{}",
        run.stderr
    );
}

#[test]
fn version_help_and_usage_errors() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let run = tilectl_ok(s, &["--version"]);
    assert!(run.stdout.starts_with("tilectl "), "{}", run.stdout);
    let run = tilectl_ok(s, &["run", "--help"]);
    for flag in [
        "--prompt",
        "--prompt-ids",
        "--expert-slots",
        "--logprobs",
        "--device",
        "--json",
    ] {
        assert!(run.stdout.contains(flag), "run --help lacks {flag}");
    }
    for (args, message) in [
        (&["run", "m"][..], "required"),
        (
            &["run", "m", "-p", "x", "--expert-slots", "0"][..],
            "must be at least 1",
        ),
        (
            &["run", "m", "-p", "x", "--logprobs", "many"][..],
            "--logprobs",
        ),
        (
            &["run", "m", "-p", "x", "--device", "gpu"][..],
            "\"gpu\" is not a device",
        ),
        (&["frobnicate"][..], "unrecognized subcommand"),
    ] {
        let run = tilectl(s, args);
        assert!(!run.ok, "{args:?} succeeded");
        assert!(
            run.stderr.contains(message) && !run.stderr.contains("panicked"),
            "{args:?}: {}",
            run.stderr
        );
    }
}
