//! The metrics module against a real InfluxDB 1.6 (Debian's `influxdb`): values and Telegraf's
//! schema queried back, an outage with an agent restart, authentication, a rejected batch, and
//! names with spaces, commas and equals signs inside a network namespace of our own.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use thingsly_e2e::*;

const DB: &str = "telegraf";

fn metrics_agent(dir: &Path, id: &str, metrics: &str, influxdb: &str) -> Agent {
    let o = AgentOpts {
        device_id: id.into(),
        extra: format!(
            "\n[metrics]\ninterval = \"1s\"\n{metrics}\n[metrics.influxdb]\n{influxdb}\n"
        ),
        ..Default::default()
    };
    Agent::new(dir, &o).unwrap()
}

fn module(agent: &Agent) -> Value {
    agent.status()["state"]["modules"]["metrics"].clone()
}

fn counter(agent: &Agent, name: &str) -> u64 {
    module(agent)["counters"][name].as_u64().unwrap_or(0)
}

/// Timestamps (unix s) of the `system uptime` points of `host`: one per collection.
fn ticks(influx: &Influx, host: &str) -> Vec<i64> {
    influx
        .rows(
            DB,
            &format!("SELECT uptime FROM system WHERE host = '{host}' AND uptime >= 0"),
        )
        .iter()
        .filter_map(|r| r[0].as_str().map(String::from))
        .map(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .unwrap()
                .unix_timestamp()
        })
        .collect()
}

fn field_keys(influx: &Influx) -> BTreeMap<(String, String), String> {
    let v = influx.query(DB, "SHOW FIELD KEYS");
    let mut out = BTreeMap::new();
    for s in v["results"][0]["series"].as_array().into_iter().flatten() {
        let m = s["name"].as_str().unwrap().to_string();
        for row in s["values"].as_array().into_iter().flatten() {
            out.insert(
                (m.clone(), row[0].as_str().unwrap().to_string()),
                row[1].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[test]
fn points_come_back_with_their_values_and_telegrafs_schema() {
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), false, None).unwrap();
    influx.start().unwrap();
    // `lo` is listed so `net` is reported on any machine (default: up, non-loopback only).
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-schema",
        "interfaces = [\"lo\"]\n[metrics.tags]\nsite = \"plant 3, hall=b\"\n",
        &format!("url = \"{}\"\n", influx.url()),
    );
    agent.start().unwrap();
    wait_for("cpu and diskio rates", Duration::from_secs(30), || {
        !influx
            .rows(DB, "SELECT usage_idle FROM cpu WHERE cpu = 'cpu-total'")
            .is_empty()
            && !influx.rows(DB, "SELECT io_util FROM diskio").is_empty()
    });

    // Values: mem total is MemTotal, the host tag is the device id, the configured tag kept.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let rows = influx.rows(DB, "SELECT total, host, site FROM mem");
    assert_eq!(rows[0][1].as_u64(), Some(kb * 1024), "{rows:?}");
    assert_eq!(rows[0][2], "dev-schema");
    assert_eq!(rows[0][3], "plant 3, hall=b");
    let n_cpus = influx.rows(DB, "SELECT n_cpus FROM system WHERE n_cpus >= 0");
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(n_cpus[0][1].as_u64(), Some(cpus as u64));
    let idle = influx.rows(DB, "SELECT usage_idle FROM cpu WHERE cpu = 'cpu-total'");
    let idle = idle[0][1].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&idle), "{idle}");
    let root = influx.rows(DB, "SELECT total, used, free FROM disk WHERE path = '/'");
    if let Some(r) = root.first() {
        let st = rustix::fs::statvfs("/").unwrap();
        assert_eq!(r[1].as_u64(), Some(st.f_blocks * st.f_frsize));
    }
    let uptime_format = influx.rows(DB, "SELECT uptime_format FROM system");
    assert!(
        uptime_format[0][1].as_str().unwrap().contains(':'),
        "{uptime_format:?}"
    );
    let lo = influx.rows(
        DB,
        "SELECT bytes_recv, speed FROM net WHERE interface = 'lo'",
    );
    assert!(
        lo[0][1].as_u64().is_some() && lo[0][2].as_i64().is_some(),
        "{lo:?}"
    );

    // Schema: every field Telegraf writes, with Telegraf's type; nothing else in its measurements.
    let got = field_keys(&influx);
    let fixture = include_str!("../fixtures/telegraf-fields.txt");
    let mut want = BTreeSet::new();
    for line in fixture
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let key = (f[0].to_string(), f[1].to_string());
        want.insert(key.clone());
        match got.get(&key) {
            Some(ty) => assert_eq!(ty, f[2], "{key:?}"),
            None => assert!(f.get(3) == Some(&"when-io"), "missing {key:?}; got {got:?}"),
        }
    }
    for (key, ty) in &got {
        if key.0 == "agent" {
            let expect = match key.1.as_str() {
                "cpu_time" => "float",
                k if k.starts_with("module_") => "string",
                _ => "integer",
            };
            assert_eq!(ty, expect, "{key:?}");
        } else {
            assert!(want.contains(key), "{key:?} is not a Telegraf field");
        }
    }
    for k in [
        "rss_bytes",
        "buffered_points",
        "dropped_points",
        "write_errors",
        "module_metrics",
    ] {
        assert!(got.contains_key(&("agent".into(), k.into())), "agent.{k}");
    }
    let (_, once, err) = agent.cmd(&["metrics", "--once", "--interval", "300ms"]);
    assert!(
        once.lines().any(|l| l.starts_with(
            "cpu,cpu=cpu-total,host=dev-schema,site=plant\\ 3\\,\\ hall\\=b usage_user="
        )),
        "{once}\n{err}"
    );
    assert!(once.lines().all(|l| l.split(' ').count() >= 3), "{once}");
    let m = module(&agent);
    assert_eq!(m["state"], "running", "{m}");
    assert!(counter(&agent, "points_written") > 0, "{m}");
    assert_eq!(counter(&agent, "write_errors"), 0, "{m}");
    agent.proc.as_mut().unwrap().terminate();
}

/// Escaping checked by the database itself: what the encoder writes reads back unchanged.
#[test]
fn line_protocol_escaping_round_trips_through_influxdb() {
    use thingsly_metrics::lineproto::{Encoder, Point, Precision, Value as V};
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), false, None).unwrap();
    influx.start().unwrap();
    influx.query("", &format!("CREATE DATABASE \"{DB}\""));
    let nasty = "a b,c=d\"e\\f";
    let mut p = Point::new("odd measure,ment").tag("tag key=1", nasty);
    p.field("field key, =", V::Str("say \"hi\"\\\nnext line".into()));
    p.int("n", 7);
    let mut line = String::new();
    Encoder::new([("host".into(), "dev 1".into())], Precision::S).encode(
        &mut line,
        &p,
        1_700_000_000_000_000_000,
    );
    let (code, body) = influx.write(DB, &line);
    assert_eq!(code, "204", "{line}: {body}");
    let v = influx.query(DB, "SELECT * FROM \"odd measure,ment\"");
    let s = &v["results"][0]["series"][0];
    let cols: Vec<&str> = s["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let row = &s["values"][0];
    let col = |name: &str| {
        &row[cols
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("{name} in {cols:?}"))]
    };
    assert_eq!(col("tag key=1"), nasty);
    assert_eq!(col("host"), "dev 1");
    assert_eq!(col("field key, ="), "say \"hi\"\\\nnext line");
    assert_eq!(col("n"), 7);
}

#[test]
fn outage_with_agent_restart_loses_nothing_and_keeps_order() {
    let outage = Duration::from_secs(
        std::env::var("THINGSLY_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), false, None).unwrap();
    influx.start().unwrap();
    // Small batches so the backlog drains in many requests and the order can be watched.
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-outage",
        "metric_batch_size = 40\npercpu = false\n",
        &format!("url = \"{}\"\n", influx.url()),
    );
    agent.start().unwrap();
    wait_for("first points", Duration::from_secs(20), || {
        ticks(&influx, "dev-outage").len() >= 3
    });
    let spool = agent.state().join("spool/metrics");
    let files = |d: &Path| {
        std::fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(files(&spool), 0, "healthy: nothing is written to flash");

    influx.stop();
    let down_at = Instant::now();
    wait_for("points buffered on disk", Duration::from_secs(20), || {
        files(&spool) >= 3
    });
    std::thread::sleep(outage / 3);
    // Power cut in the middle of the outage (SIGKILL: nothing runs at exit), then a restart.
    agent.proc.as_mut().unwrap().kill();
    let stopped = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_secs(2));
    agent.start().unwrap();
    let restarted = std::time::SystemTime::now();
    std::thread::sleep(outage.saturating_sub(down_at.elapsed()));
    let buffered = counter(&agent, "buffered_points");
    assert!(buffered > 0, "{}", module(&agent));
    assert_eq!(module(&agent)["state"], "waiting", "{}", module(&agent));
    influx.start().unwrap();
    let up_at = unix(std::time::SystemTime::now());

    // While it drains, the outage's collections appear oldest first: never a gap followed by
    // a later point.
    let mut polls = 0;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let got = ticks(&influx, "dev-outage");
        let gaps: Vec<_> = got
            .windows(2)
            .filter(|w| w[1] - w[0] > 1)
            .map(|w| (w[0], w[1]))
            .collect();
        let allowed = |(a, b): &(i64, i64)| *a <= unix(stopped) + 1 && *b >= unix(restarted) - 1;
        let newest = got.last().copied().unwrap_or(0);
        if newest < up_at {
            // Still draining: the only gap may be the agent's own down time.
            assert!(
                gaps.iter().all(allowed),
                "out of order while draining: {gaps:?}"
            );
        }
        polls += 1;
        if counter(&agent, "buffered_points") == 0 && newest >= up_at {
            assert!(gaps.iter().all(allowed), "lost points: {gaps:?}");
            break;
        }
        assert!(
            Instant::now() < end,
            "drain did not finish: {}",
            module(&agent)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = ticks(&influx, "dev-outage");
    let during: Vec<_> = all
        .iter()
        .filter(|t| **t > unix(stopped) - 60 && **t < up_at)
        .collect();
    assert!(
        during.len() as u64 >= outage.as_secs() - 5,
        "{} points of the outage",
        during.len()
    );
    assert_eq!(counter(&agent, "dropped_points"), 0);
    assert!(polls > 1);
    assert_eq!(files(&spool), 0);
    eprintln!(
        "outage {outage:?}: {} collections recovered, drained in {polls} polls",
        during.len()
    );
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// At `metric_buffer_limit` the oldest collections go first; the drop is counted, survives a
/// restart, and reaches InfluxDB in the `agent` measurement.
#[test]
fn buffer_bound_drops_the_oldest_and_counts_them() {
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), false, None).unwrap();
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-bound",
        "percpu = false\nmetric_batch_size = 50\nmetric_buffer_limit = 100\n",
        &format!("url = \"{}\"\n", influx.url()),
    );
    // InfluxDB is not there yet.
    agent.start().unwrap();
    let started = unix(std::time::SystemTime::now());
    wait_for("drops counted", Duration::from_secs(60), || {
        counter(&agent, "dropped_points") > 0
    });
    let buffered = counter(&agent, "buffered_points");
    assert!(buffered <= 100, "bound exceeded: {buffered}");
    agent.proc.as_mut().unwrap().terminate();
    let dropped = counter(&agent, "dropped_points");
    agent.start().unwrap();
    influx.start().unwrap();
    wait_for("backlog written", Duration::from_secs(30), || {
        counter(&agent, "buffered_points") == 0 && counter(&agent, "points_written") > 0
    });
    assert!(
        counter(&agent, "dropped_points") >= dropped,
        "drop count persisted"
    );
    let got = ticks(&influx, "dev-bound");
    assert!(
        got[0] > started + 1,
        "the oldest were dropped, not the newest: {} vs start {started}",
        got[0]
    );
    let reported = influx.rows(
        DB,
        "SELECT max(dropped_points) FROM agent WHERE host = 'dev-bound'",
    );
    assert!(reported[0][1].as_u64().unwrap() >= dropped, "{reported:?}");
}

#[test]
fn wrong_password_is_a_clear_error_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), true, None).unwrap();
    influx.start().unwrap();
    influx.create_writer(DB, "agent", "right-pw");
    let dir = t.path().join("agent");
    let mut agent = metrics_agent(
        &dir,
        "dev-auth",
        "",
        &format!(
            "url = \"{}\"\nusername = \"agent\"\npassword = \"wrong-pw\"\n",
            influx.url()
        ),
    );
    agent.start().unwrap();
    let first = unix(std::time::SystemTime::now());
    wait_for("auth error reported", Duration::from_secs(20), || {
        module(&agent)["detail"]
            .as_str()
            .unwrap_or("")
            .contains("authorization failed")
    });
    let m = module(&agent);
    assert_eq!(m["state"], "waiting", "{m}");
    assert!(
        m["detail"]
            .as_str()
            .unwrap()
            .contains("check metrics.influxdb"),
        "{m}"
    );
    assert!(agent.log_text().contains("authorization failed"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(counter(&agent, "buffered_points") > 0);
    assert!(ticks(&influx, "dev-auth").is_empty());
    // The operator fixes the password and restarts the service.
    agent.proc.as_mut().unwrap().terminate();
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace("wrong-pw", "right-pw");
    std::fs::write(&agent.config, cfg).unwrap();
    agent.start().unwrap();
    wait_for("backlog written", Duration::from_secs(60), || {
        counter(&agent, "buffered_points") == 0 && counter(&agent, "points_written") > 0
    });
    let got = ticks(&influx, "dev-auth");
    assert!(
        got[0] <= first + 1,
        "first collection {} kept (start {first})",
        got[0]
    );
    let gaps: Vec<_> = got.windows(2).filter(|w| w[1] - w[0] > 1).collect();
    assert!(
        gaps.len() <= 1,
        "only the restart may leave a gap: {gaps:?}"
    );
    assert_eq!(module(&agent)["state"], "running");
}

/// A 4xx (here a field type conflict InfluxDB really answers) drops that batch once, logs
/// InfluxDB's message and counts the points; it is not retried.
#[test]
fn rejected_batch_is_dropped_with_influxdbs_message() {
    let t = tempfile::tempdir().unwrap();
    let mut influx = Influx::new(&t.path().join("influx"), false, None).unwrap();
    influx.start().unwrap();
    influx.query("", &format!("CREATE DATABASE \"{DB}\""));
    // Someone wrote mem.total as a float before: every mem point of ours now conflicts.
    // Types are pinned per shard (a week here), so the earlier point must be recent.
    let recent = unix(std::time::SystemTime::now()) - 60;
    let (code, body) = influx.write(DB, &format!("mem,host=other total=1.5 {recent}\n"));
    assert_eq!(code, "204", "{body}");
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-4xx",
        "",
        &format!("url = \"{}\"\n", influx.url()),
    );
    agent.start().unwrap();
    wait_for("rejections counted", Duration::from_secs(20), || {
        counter(&agent, "rejected_points") > 0
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.log_text().contains("field type conflict"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        counter(&agent, "buffered_points"),
        0,
        "a 4xx is never retried"
    );
    // The other points of each batch are stored (InfluxDB's partial write).
    assert!(ticks(&influx, "dev-4xx").len() >= 3);
    assert!(
        module(&agent)["detail"]
            .as_str()
            .unwrap()
            .contains("field type conflict")
    );
}

/// Interface names with commas and equals signs (the kernel allows no spaces in them) and a
/// mount path with spaces, commas and an equals sign, in a namespace of our own.
#[test]
fn odd_interface_names_and_mount_paths() {
    let t = tempfile::tempdir().unwrap();
    let ns = Netns::new("odd").unwrap();
    ns.ip(&[
        "link", "add", "a,b=1", "type", "veth", "peer", "name", "x=y,z",
    ])
    .unwrap();
    ns.ip(&["link", "set", "a,b=1", "up"]).unwrap();
    ns.ip(&["link", "set", "x=y,z", "up"]).unwrap();
    // A read-write tmpfs and a read-only one; both paths need escaping.
    let mnt = t.path().join("data a,b=c");
    let ro = t.path().join("ro x=1");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = run(&["umount", self.0.to_str().unwrap()]);
        }
    }
    let mut _umount = Vec::new();
    for (dir, opts) in [(&mnt, "size=4m"), (&ro, "ro,size=2m")] {
        std::fs::create_dir_all(dir).unwrap();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            opts,
            "tmpfs",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        _umount.push(Umount(dir.clone()));
    }
    let mut influx = Influx::new(&t.path().join("influx"), false, Some(&ns.name)).unwrap();
    influx.start().unwrap();
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-odd",
        &format!(
            "ignore_fs = []\nmount_points = [\"{}\", \"{}\"]\n",
            mnt.display(),
            ro.display()
        ),
        &format!("url = \"{}\"\n", influx.url()),
    );
    agent.netns = Some(ns.name.clone());
    agent.start().unwrap();
    wait_for("net and disk points", Duration::from_secs(20), || {
        !influx.rows(DB, "SELECT bytes_sent FROM net").is_empty()
            && !influx.rows(DB, "SELECT total FROM disk").is_empty()
    });
    let ifaces: BTreeSet<String> = influx
        .rows(DB, "SHOW TAG VALUES FROM net WITH KEY = \"interface\"")
        .iter()
        .map(|r| r[1].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ifaces,
        BTreeSet::from(["a,b=1".to_string(), "x=y,z".to_string()]),
        "loopback is not reported by default"
    );
    wait_for("both mounts", Duration::from_secs(10), || {
        influx
            .rows(DB, "SHOW TAG VALUES FROM disk WITH KEY = \"path\"")
            .len()
            == 2
    });
    let by_path = influx.query(
        DB,
        "SELECT last(total), fstype, mode, device FROM disk GROUP BY path",
    );
    let mut got = BTreeMap::new();
    for series in by_path["results"][0]["series"].as_array().unwrap() {
        let v = &series["values"][0];
        got.insert(
            series["tags"]["path"].as_str().unwrap().to_string(),
            (
                v[1].as_u64().unwrap(),
                v[2].as_str().unwrap().to_string(),
                v[3].as_str().unwrap().to_string(),
                v[4].as_str().unwrap().to_string(),
            ),
        );
    }
    let want = BTreeMap::from([
        (
            mnt.display().to_string(),
            (4 << 20, "tmpfs".into(), "rw".into(), "tmpfs".into()),
        ),
        (
            ro.display().to_string(),
            (2 << 20, "tmpfs".into(), "ro".into(), "tmpfs".into()),
        ),
    ]);
    assert_eq!(got, want);
    agent.proc.as_mut().unwrap().terminate();
}

/// InfluxDB 2.x is not packaged for Debian bookworm, so the v2 API is checked against a
/// scripted HTTP server: path, query, token, gzip, and Retry-After on 429 honoured.
#[test]
fn v2_api_request_shape_and_retry_after() {
    use std::io::{BufRead, BufReader, Read, Write};
    struct Req {
        at: Instant,
        head: String,
        body: Vec<u8>,
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel::<Req>();
    std::thread::spawn(move || {
        let mut n = 0;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut w = conn;
            loop {
                let mut head = String::new();
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 2 {
                    head.push_str(&line);
                    line.clear();
                }
                if head.is_empty() {
                    break;
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                n += 1;
                let reply = match n {
                    1 => {
                        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"message\":\"slow down pls\"}"
                    }
                    2 => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                    _ => "HTTP/1.1 204 No Content\r\n\r\n",
                };
                let _ = tx.send(Req {
                    at: Instant::now(),
                    head,
                    body,
                });
                if w.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    let t = tempfile::tempdir().unwrap();
    let mut agent = metrics_agent(
        &t.path().join("agent"),
        "dev-v2",
        "",
        &format!(
            "url = \"http://127.0.0.1:{port}\"\napi = \"v2\"\norganization = \"acme co\"\nbucket = \"edge\"\ntoken = \"tok-123\"\n"
        ),
    );
    agent.start().unwrap();
    let reqs: Vec<Req> = (0..4)
        .map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap())
        .collect();
    agent.proc.as_mut().unwrap().terminate();
    let first = &reqs[0].head;
    assert!(
        first.starts_with("POST /api/v2/write?org=acme+co&bucket=edge&precision=s HTTP/1.1"),
        "{first}"
    );
    let lower = first.to_ascii_lowercase();
    assert!(lower.contains("authorization: token tok-123"), "{first}");
    assert!(lower.contains("content-encoding: gzip"), "{first}");
    assert!(
        lower.contains("content-type: text/plain; charset=utf-8"),
        "{first}"
    );
    let gunzip = |b: &[u8]| {
        let mut s = String::new();
        flate2::read::GzDecoder::new(b)
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    let first_body = gunzip(&reqs[0].body);
    assert!(
        first_body
            .lines()
            .any(|l| l.starts_with("mem,host=dev-v2 total=")),
        "{first_body}"
    );
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After: 3 not honoured: {gap:?}"
    );
    // The collection refused twice is in the first successful request, ahead of newer ones.
    let ok_body = gunzip(&reqs[2].body);
    let first_line = first_body.lines().next().unwrap();
    assert_eq!(ok_body.lines().next(), Some(first_line), "oldest first");
    assert!(agent.log_text().contains("slow down pls"));
}
