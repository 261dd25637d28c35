//! Following a migration: live bars on a terminal (one per table being
//! copied, with rows, bytes, rate and ETA), plain lines when stdout is
//! piped, nothing with `--json` (the final document says it all).

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use walbridge_proto::v1 as wire;

pub enum Follow {
    Bars(Bars),
    Lines(Lines),
    Quiet,
}

impl Follow {
    /// Bars on a terminal, lines otherwise; quiet for `--json`.
    pub fn new(json: bool) -> Follow {
        if json {
            Follow::Quiet
        } else if std::io::stdout().is_terminal() {
            Follow::Bars(Bars::new())
        } else {
            Follow::Lines(Lines::default())
        }
    }

    pub fn update(&mut self, status: &wire::StatusResponse) {
        match self {
            Follow::Bars(bars) => bars.update(status),
            Follow::Lines(lines) => lines.update(status),
            Follow::Quiet => {}
        }
    }

    pub fn finish(&mut self) {
        if let Follow::Bars(bars) = self {
            bars.finish();
        }
    }
}

fn is_done(state: &str) -> bool {
    matches!(state, "copied" | "verified")
}

/// The line a finished table gets, in both modes.
fn finished_line(table: &wire::TableStatus) -> String {
    let rate = if table.copy_seconds > 0.0 {
        table.bytes as f64 / table.copy_seconds / 1e6
    } else {
        0.0
    };
    format!(
        "{} {}: {} rows, {:.1} MB in {:.1} s ({rate:.1} MB/s)",
        table.state,
        table.name,
        table.rows,
        table.bytes as f64 / 1e6,
        table.copy_seconds
    )
}

/// Plain output: each phase once, each finished table once.
#[derive(Default)]
pub struct Lines {
    phase: String,
    reported: BTreeSet<String>,
}

impl Lines {
    fn update(&mut self, status: &wire::StatusResponse) {
        if status.phase != self.phase {
            println!("phase: {}", status.phase);
            self.phase = status.phase.clone();
        }
        for table in status.tables.iter().filter(|t| is_done(&t.state)) {
            if self.reported.insert(table.name.clone()) {
                println!("{}", finished_line(table));
            }
        }
    }
}

/// Terminal output: a header line and a bar per table being copied.
pub struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    tables: BTreeMap<String, ProgressBar>,
    reported: BTreeSet<String>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
        header.enable_steady_tick(Duration::from_millis(120));
        Bars {
            multi,
            header,
            tables: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    fn bar_style() -> ProgressStyle {
        ProgressStyle::with_template(
            "  {prefix:32!} [{bar:24}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta:>4} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> ")
    }

    fn update(&mut self, status: &wire::StatusResponse) {
        let done = status.tables.iter().filter(|t| is_done(&t.state)).count();
        let bytes: u64 = status.tables.iter().map(|t| t.bytes).sum();
        self.header.set_message(format!(
            "phase {} · {done}/{} tables · {:.1} MB copied",
            status.phase,
            status.tables.len(),
            bytes as f64 / 1e6
        ));
        for table in &status.tables {
            if is_done(&table.state) {
                if let Some(bar) = self.tables.remove(&table.name) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if self.reported.insert(table.name.clone()) {
                    let _ = self.multi.println(finished_line(table));
                }
            } else if table.state == "copying" {
                let bar = self.tables.entry(table.name.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(table.size_bytes.max(1)));
                    bar.set_style(Self::bar_style());
                    bar.set_prefix(table.name.clone());
                    bar
                });
                // COPY text can outgrow the table's size on disk.
                if table.bytes > bar.length().unwrap_or(0) {
                    bar.set_length(table.bytes);
                }
                bar.set_position(table.bytes);
                bar.set_message(format!("{} rows", table.rows));
            }
        }
    }

    fn finish(&mut self) {
        for bar in self.tables.values() {
            bar.finish_and_clear();
        }
        self.header.finish_and_clear();
    }
}
