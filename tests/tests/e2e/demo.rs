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
    // --json: the report is one JSON document on stdout, the narration on
    // stderr.
    let out = walbridge(&["demo", "--json"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "demo: {stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout}"));
    assert!(report["copy"]["rows"].as_u64().unwrap() >= 92_000, "{report}");
    assert!(report["lag_before_cutover"]["seconds"].is_f64(), "{report}");
    assert!(
        report["cutover"]["write_downtime_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let steps: Vec<&str> = report["cutover"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(steps.contains(&"catch up") && steps.ends_with(&["detach"]), "{report}");
    assert!(report["application"]["acknowledged_writes"].as_u64().unwrap() > 0);
    assert!(
        report["application"]["stopped_by"]
            .as_str()
            .unwrap()
            .contains("are fenced"),
        "{report}"
    );
    assert_eq!(report["verify"]["exact"], 5, "{report}");
    assert_eq!(report["verify"]["tables"], 5, "{report}");
    assert!(
        report["cleanup_removed"].to_string().contains("subscription"),
        "{report}"
    );
    assert!(
        report["release_source_removed"].to_string().contains("the write fence"),
        "{report}"
    );
    for line in ["agent demo connected", "copied", "removed the demo's clusters"] {
        assert!(stderr.contains(line), "{line:?} in the narration:\n{stderr}");
    }
    assert_eq!(demo_leftovers(), before, "the demo's folders are gone");
}
