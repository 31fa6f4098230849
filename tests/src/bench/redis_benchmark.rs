//! The end-to-end workloads: `redis-benchmark` command lines and the
//! parser of its `--csv` output (redis-benchmark 7).
//!
//! Not here: where it runs (see [`super::lab_run`]).

use std::net::SocketAddr;

/// One `redis-benchmark` invocation of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `-t set,get -c 50`: a SET test then a GET test.
    SetGet,
    /// `-t get -P 16 -c 50`: GETs pipelined 16 deep.
    GetPipelined,
    /// `-t get -c 200` of a 1 KiB value.
    GetKib,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::SetGet, Workload::GetPipelined, Workload::GetKib];

    pub fn clients(self) -> u32 {
        match self {
            Workload::SetGet | Workload::GetPipelined => 50,
            Workload::GetKib => 200,
        }
    }

    /// Bytes of the value stored under the benchmark's key before a run.
    pub fn value_size(self) -> usize {
        match self {
            Workload::SetGet | Workload::GetPipelined => 3,
            Workload::GetKib => 1024,
        }
    }

    /// Requests per test (`-n`) of a full or a quick run.
    pub fn requests(self, quick: bool) -> u32 {
        match (self, quick) {
            (Workload::SetGet, false) => 100_000,
            (Workload::GetPipelined, false) => 1_000_000,
            (Workload::GetKib, false) => 100_000,
            (Workload::SetGet, true) => 2_000,
            (Workload::GetPipelined, true) => 16_000,
            (Workload::GetKib, true) => 2_000,
        }
    }

    /// Tests the invocation runs, in order (CSV rows).
    pub fn tests(self) -> &'static [&'static str] {
        match self {
            Workload::SetGet => &["SET", "GET"],
            Workload::GetPipelined | Workload::GetKib => &["GET"],
        }
    }

    /// The `redis-benchmark` arguments against `target`.
    pub fn args(self, target: SocketAddr, requests: u32) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-h".into(),
            target.ip().to_string(),
            "-p".into(),
            target.port().to_string(),
            "-c".into(),
            self.clients().to_string(),
            "-n".into(),
            requests.to_string(),
            "--csv".into(),
        ];
        match self {
            Workload::SetGet => a.extend(["-t".into(), "set,get".into()]),
            Workload::GetPipelined => {
                a.extend(["-t".into(), "get".into(), "-P".into(), "16".into()])
            }
            Workload::GetKib => a.extend(["-t".into(), "get".into(), "-d".into(), "1024".into()]),
        }
        a
    }

    /// The row label of test `test` of this workload in the report.
    pub fn label(self, test: &str) -> String {
        match self {
            Workload::SetGet => format!("{test}, 50 clients"),
            Workload::GetPipelined => "GET pipelined ×16, 50 clients".into(),
            Workload::GetKib => "GET 1 KiB, 200 clients".into(),
        }
    }
}

/// One CSV row: a test's throughput and latency.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    pub test: String,
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsvError {
    #[error("redis-benchmark printed no CSV header (\"test\",\"rps\",...): {0:?}")]
    NoHeader(String),
    #[error("redis-benchmark's CSV header lacks column {0}")]
    MissingColumn(&'static str),
    #[error("redis-benchmark CSV line {line}: {problem}")]
    BadRow { line: usize, problem: String },
}

fn fields(line: &str) -> Vec<String> {
    line.split(',')
        .map(|f| f.trim().trim_matches('"').to_string())
        .collect()
}

/// Parses `redis-benchmark --csv` output: a header line naming the columns
/// (`"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...`)
/// and one line per test. Other lines (warnings) are ignored.
pub fn parse_csv(out: &str) -> Result<Vec<TestResult>, CsvError> {
    let mut lines = out.lines().enumerate();
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.trim_start().starts_with("\"test\"") => break fields(l),
            Some(_) => continue,
            None => return Err(CsvError::NoHeader(out.chars().take(200).collect())),
        }
    };
    let col = |name: &'static str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or(CsvError::MissingColumn(name))
    };
    let (rps, avg, p50, p99, max) = (
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    );
    let mut rows = Vec::new();
    for (i, line) in lines {
        if !line.trim_start().starts_with('"') {
            continue;
        }
        let f = fields(line);
        if f.len() != header.len() {
            return Err(CsvError::BadRow {
                line: i + 1,
                problem: format!("{} fields, header has {}", f.len(), header.len()),
            });
        }
        let num = |idx: usize| {
            f[idx].parse::<f64>().map_err(|_| CsvError::BadRow {
                line: i + 1,
                problem: format!("{:?} ({}) is not a number", f[idx], header[idx]),
            })
        };
        rows.push(TestResult {
            test: f[0].clone(),
            rps: num(rps)?,
            avg_ms: num(avg)?,
            p50_ms: num(p50)?,
            p99_ms: num(p99)?,
            max_ms: num(max)?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
\"SET\",\"81300.81\",\"0.335\",\"0.088\",\"0.327\",\"0.463\",\"0.575\",\"1.503\"\n\
\"GET\",\"90909.09\",\"0.301\",\"0.080\",\"0.295\",\"0.407\",\"0.511\",\"0.991\"\n";

    #[test]
    fn parses_redis_benchmark_7_csv() {
        let rows = parse_csv(OUT).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].test, "SET");
        assert_eq!(rows[0].rps, 81300.81);
        assert_eq!(rows[0].p50_ms, 0.327);
        assert_eq!(rows[0].p99_ms, 0.575);
        assert_eq!(rows[1].test, "GET");
        assert_eq!(rows[1].max_ms, 0.991);
    }

    #[test]
    fn skips_warnings_before_the_header() {
        let out = format!("WARNING: Could not fetch server CONFIG\n{OUT}");
        assert_eq!(parse_csv(&out).unwrap().len(), 2);
    }

    #[test]
    fn rejects_output_without_header_or_with_bad_numbers() {
        assert!(matches!(
            parse_csv("Error: Connection refused"),
            Err(CsvError::NoHeader(_))
        ));
        let bad = OUT.replace("81300.81", "fast");
        assert!(matches!(
            parse_csv(&bad),
            Err(CsvError::BadRow { line: 2, .. })
        ));
        let short = "\"test\",\"rps\"\n\"SET\",\"1\"\n";
        assert_eq!(
            parse_csv(short),
            Err(CsvError::MissingColumn("avg_latency_ms"))
        );
    }

    #[test]
    fn workloads_name_their_flags() {
        let t: SocketAddr = "198.18.0.100:6380".parse().unwrap();
        let a = Workload::GetPipelined.args(t, 10).join(" ");
        assert!(
            a.contains("-P 16") && a.contains("-c 50") && a.contains("-n 10"),
            "{a}"
        );
        let a = Workload::GetKib.args(t, 10).join(" ");
        assert!(a.contains("-d 1024") && a.contains("-c 200"), "{a}");
        assert_eq!(Workload::SetGet.tests(), &["SET", "GET"]);
    }
}
