//! What a scrape gets: the registry in the format the scraper asks for (OpenMetrics, or the
//! Prometheus text format 0.0.4 for a client that asks only for `text/plain`), with every
//! family described from the start, even one with no series yet.
use prometheus_client::{encoding::EncodeMetric, registry::Registry};

/// The registry, and the families it holds that may have no series (prometheus-client writes
/// nothing for those, not even HELP and TYPE).
pub(crate) struct Exposition {
    registry: Registry,
    prefix: &'static str,
    /// (name without the prefix, help, OpenMetrics type) of each such family.
    families: Vec<(&'static str, &'static str, &'static str)>,
}

/// The two text formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    OpenMetrics,
    Text004,
}

impl Format {
    /// What `Accept` asks for: OpenMetrics when it names it, or names neither; the 0.0.4 text
    /// format when it names `text/plain` and not OpenMetrics.
    pub(crate) fn negotiate(accept: Option<&str>) -> Self {
        let accept = accept.unwrap_or("").to_ascii_lowercase();
        if !accept.contains("application/openmetrics-text") && accept.contains("text/plain") {
            Format::Text004
        } else {
            Format::OpenMetrics
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

impl Exposition {
    /// Metrics registered under `prefix_` (the standard `process_*` ones go in first, without).
    pub(crate) fn new(root: Registry, prefix: &'static str) -> Self {
        Self {
            registry: root,
            prefix,
            families: Vec::new(),
        }
    }

    /// A metric that always has its series (a counter, a gauge, a histogram).
    pub(crate) fn register(
        &mut self,
        name: &'static str,
        help: &'static str,
        metric: impl EncodeMetric + Clone + Send + Sync + std::fmt::Debug + 'static,
    ) {
        self.registry
            .sub_registry_with_prefix(self.prefix)
            .register(name, help, metric);
    }

    /// A family of labelled series (`kind`: its OpenMetrics type), described even while empty.
    pub(crate) fn register_family(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        family: impl EncodeMetric + Clone + Send + Sync + std::fmt::Debug + 'static,
    ) {
        self.families.push((name, help, kind));
        self.register(name, help, family);
    }

    pub(crate) fn registry_mut(&mut self) -> &mut Registry {
        self.registry.sub_registry_with_prefix(self.prefix)
    }

    /// The registry as `format` says; None if encoding failed.
    pub(crate) fn encode(&self, format: Format) -> Option<String> {
        let mut body = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut body, &self.registry).ok()?;
        let body = self.describe_empty(&body);
        Some(match format {
            Format::OpenMetrics => body,
            Format::Text004 => text_004(&body),
        })
    }

    /// `body` with HELP and TYPE for each family that wrote none (before `# EOF`).
    fn describe_empty(&self, body: &str) -> String {
        let mut out = body.strip_suffix("# EOF\n").unwrap_or(body).to_string();
        for (name, help, kind) in &self.families {
            let full = format!("{}_{name}", self.prefix);
            if !body.contains(&format!("# TYPE {full} ")) {
                out += &format!("# HELP {full} {help}.\n# TYPE {full} {kind}\n");
            }
        }
        out + "# EOF\n"
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's HELP and TYPE name its
/// sample (`_total`), and there are no UNIT lines and no `# EOF`.
fn text_004(om: &str) -> String {
    let counters: Vec<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        out += renamed.as_deref().unwrap_or(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

    use super::*;

    fn exposition() -> (Exposition, Family<Vec<(String, String)>, Counter>) {
        let mut e = Exposition::new(Registry::default(), "finwait");
        let seen: Family<Vec<(String, String)>, Counter> = Family::default();
        let empty: Family<Vec<(String, String)>, Gauge> = Family::default();
        e.register_family("seen", "Seen", "counter", seen.clone());
        e.register_family("empty", "Nothing yet", "gauge", empty);
        seen.get_or_create(&vec![("comm".into(), "nginx".into())])
            .inc();
        (e, seen)
    }

    /// A family with no series yet is described all the same, once.
    #[test]
    fn every_family_is_described_from_the_start() {
        let (e, _) = exposition();
        let om = e.encode(Format::OpenMetrics).unwrap();
        assert!(
            om.contains("# HELP finwait_empty Nothing yet.\n# TYPE finwait_empty gauge\n"),
            "{om}"
        );
        assert_eq!(om.matches("# TYPE finwait_seen counter").count(), 1, "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    /// Prometheus's own negotiation prefers OpenMetrics; a client asking for text/plain only
    /// gets 0.0.4, whose counter descriptors name the `_total` sample.
    #[test]
    fn the_format_the_scraper_asks_for() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::OpenMetrics);
        let text = Format::negotiate(Some("text/plain;version=0.0.4"));
        assert_eq!(text, Format::Text004);
        let (e, _) = exposition();
        let t = e.encode(text).unwrap();
        assert!(t.contains("# TYPE finwait_seen_total counter\n"), "{t}");
        assert!(t.contains("finwait_seen_total{comm=\"nginx\"} 1\n"), "{t}");
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
    }
}
