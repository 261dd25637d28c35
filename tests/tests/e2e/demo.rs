//! `walbridge demo` runs the whole product and leaves nothing behind.

use harness::daemons::walbridge;

fn demo_leftovers() -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("walbridge-demo-") || name.starts_with("walbridge-pg-demo-"))
        .collect();
    found.sort();
    found
}

#[test]
fn the_demo_migrates_cuts_over_verifies_and_removes_everything() {
    let before = demo_leftovers();
    let out = walbridge(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "rows copied",
        "lag before cutover",
        "write downtime",
        "are fenced",
        "5 of 5 tables exact",
        "removed subscription",
        "release-source          removed the write fence",
    ] {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }
    assert_eq!(demo_leftovers(), before, "the demo's folders are gone");
}
