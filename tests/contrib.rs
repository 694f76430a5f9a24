//! `contrib/`: the Grafana dashboard and the Prometheus alerting rules name
//! only metrics the crate exports (and the dashboard shows every one); the
//! rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`), when promtool is installed (CI installs it).

use std::collections::BTreeSet;
use std::path::Path;

const DASHBOARD: &str = "contrib/grafana/tierlimit-dashboard.json";
const RULES: &str = "contrib/prometheus/tierlimit-alerts.yml";
const RULE_TESTS: &str = "contrib/prometheus/tierlimit-alerts.test.yml";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The `tierlimit_…` metric names in `text`, with the series suffixes of
/// summaries and histograms (`_sum`, `_count`, `_bucket`) taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let exported: Vec<&str> = tierlimit::telemetry::METRICS
        .iter()
        .map(|m| m.name)
        .collect();
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tierlimit_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(b)))
            .unwrap_or(name);
        names.insert(base.to_owned());
        i = end;
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_name_only_exported_metrics() {
    let exported: BTreeSet<String> = tierlimit::telemetry::METRICS
        .iter()
        .map(|m| m.name.to_owned())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    // The queries, as Grafana reads them.
    let mut exprs = String::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push_str(q);
            exprs.push('\n');
        }
    }
    let in_dashboard = metric_names(&exprs);
    let unknown: Vec<_> = in_dashboard.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard names {unknown:?}");
    let missing: Vec<_> = exported.difference(&in_dashboard).collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
    let rules = metric_names(&read(RULES));
    let unknown: Vec<_> = rules.difference(&exported).collect();
    assert!(unknown.is_empty(), "the rules name {unknown:?}");
    assert!(rules.len() >= 5, "{rules:?}");
    // Every panel has a title and a query (rows aside).
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
}

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("TIERLIMIT_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1") {
            panic!("TIERLIMIT_REQUIRE_PROMTOOL=1 but no promtool on PATH");
        }
        eprintln!("SKIPPED: no promtool on PATH (apt-get install prometheus to run this check)");
        return;
    }
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
