//! docs/api.yaml (OpenAPI) lists exactly the routes and methods the daemon's router serves.

use std::collections::BTreeSet;

use tileflow_tests::repo_root;

/// (path, method) pairs of the router in daemon/src/api/mod.rs.
fn router_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(repo_root().join("daemon/src/api/mod.rs")).unwrap();
    let start = src
        .find("pub fn router(")
        .expect("router() in daemon/src/api/mod.rs");
    let end = src[start..].find("\n}\n").map(|e| start + e).unwrap();
    let body = &src[start..end];
    let body = body.split(".fallback(").next().unwrap();
    let mut out = BTreeSet::new();
    // Each `.route("path", get(..).post(..))` call, however rustfmt wrapped it.
    for call in body.split(".route(").skip(1) {
        let path = call.split('"').nth(1).unwrap().to_string();
        for method in ["get", "post", "delete", "put", "patch"] {
            if call.contains(&format!("{method}(")) {
                out.insert((path.clone(), method.to_string()));
            }
        }
    }
    out
}

/// (path, method) pairs under `paths:` in docs/api.yaml.
fn documented_routes() -> BTreeSet<(String, String)> {
    let doc = std::fs::read_to_string(repo_root().join("docs/api.yaml")).unwrap();
    let paths = doc
        .split("\npaths:\n")
        .nth(1)
        .unwrap()
        .split("\ncomponents:")
        .next()
        .unwrap();
    let mut out = BTreeSet::new();
    let mut current = None;
    for line in paths.lines() {
        if let Some(p) = line.strip_prefix("  /") {
            current = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let (Some(path), Some(rest)) = (&current, line.strip_prefix("    ")) {
            if let Some(method) = ["get:", "post:", "delete:", "put:", "patch:"]
                .iter()
                .find(|m| rest.starts_with(*m))
            {
                out.insert((path.clone(), method.trim_end_matches(':').to_string()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_matches_the_router() {
    let served = router_routes();
    let documented = documented_routes();
    assert!(served.len() >= 12, "parsed too few routes: {served:?}");
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes not in docs/api.yaml: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "docs/api.yaml lists routes the daemon does not serve: {stale:?}"
    );
}
