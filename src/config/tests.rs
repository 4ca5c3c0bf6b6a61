//! The configuration's unit tests: defaults, paths, and the errors of each section.

use super::*;

fn parse(t: &str) -> Result<Config, ConfigError> {
    Config::parse(t, Path::new("/etc/koprogo/test.toml"))
}

#[test]
fn defaults_fit_a_small_vps() {
    let c = parse("").expect("empty config is valid");
    assert_eq!(c.paths.state, PathBuf::from("/var/lib/koprogo"));
    assert_eq!(c.backend.stop_timeout, Duration::from_secs(35));
    assert_eq!(c.logs.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(c.origins(), vec!["https://localhost".to_string()]);
}

#[test]
fn relative_paths_resolve_against_the_file() {
    let c = parse("[paths]\nstate = \"../st\"\nlogs = \"l\"\n").expect("valid");
    assert_eq!(c.paths.state, PathBuf::from("/etc/st"));
    assert_eq!(c.paths.logs, PathBuf::from("/etc/koprogo/l"));
}

#[test]
fn unknown_key_names_file_and_key() {
    let e = parse("[backend]\ncomand = \"x\"\n").expect_err("unknown key");
    assert!(e.0.contains("/etc/koprogo/test.toml"), "{e}");
    assert!(e.0.contains("comand"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let e = parse("[backend]\nport = \"eighty\"\n").expect_err("wrong type");
    assert!(e.0.contains("port"), "{e}");
}

#[test]
fn smtp_enabled_needs_its_values() {
    let e = parse("[backend.smtp]\nenabled = true\nhost = \"h\"\n").expect_err("smtp");
    assert!(e.0.contains("backend.smtp.username"), "{e}");
    // The four koprogo-api requires; the port is optional (587 there).
    let base = "[backend.smtp]\nenabled = true\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
    let e = parse(base).expect_err("no from_email");
    assert!(e.0.contains("backend.smtp.from_email"), "{e}");
    parse(&format!("{base}from_email = \"syndic@example.be\"\n")).expect("port optional");
    for bad in [
        "syndic",
        "Syndic <s@example.be>",
        "a@b@example.be",
        "s@",
        "s @x.be",
    ] {
        let e = parse(&format!("{base}from_email = \"{bad}\"\n")).expect_err(bad);
        assert!(e.0.contains("backend.smtp.from_email"), "{bad}: {e}");
    }
}

#[test]
fn pools_leave_room_for_an_update_swap() {
    // Defaults: 8 × (1 + 1) + 3 = 19 ≤ 20.
    parse("").expect("defaults fit");
    let e = parse("[backend]\npool_max = 9\n").expect_err("9 × 2 + 3 > 20");
    assert!(e.0.contains("during an update"), "{e}");
    parse("[postgres]\nmax_connections = 21\n[backend]\npool_max = 9\n").expect("21");
}

#[test]
fn log_level_must_be_a_filter() {
    parse("[backend]\nlog_level = \"info,sqlx=warn\"\n").expect("directives");
    let e = parse("[backend]\nlog_level = \"info,sqlx=loud\"\n").expect_err("bad level");
    assert!(e.0.contains("backend.log_level"), "{e}");
}

#[test]
fn instances_need_ports_and_connections() {
    let c = parse("[backend]\nport = 9000\ninstances = 3\npool_max = 4\n").expect("3");
    assert_eq!(c.api_ports(), 9000..9006);
    assert_eq!(parse("").expect("default").api_ports(), 8081..8083);
    let e = parse("[backend]\ninstances = 0\n").expect_err("0");
    assert!(e.0.contains("backend.instances"), "{e}");
    let e = parse("[backend]\ninstances = 3\n").expect_err("pools");
    assert!(
        e.0.contains("backend.pool_max") && e.0.contains("instances = 3"),
        "{e}"
    );
    let e = parse("[backend]\nport = 65534\ninstances = 2\npool_max = 4\n").expect_err("ports");
    assert!(e.0.contains("backend.port"), "{e}");
    let e = parse("[backend]\nport = 9000\n[proxy]\nhttps = [\"127.0.0.1:9001\"]\n")
        .expect_err("clash with the spare port");
    assert!(e.0.contains("proxy.https"), "{e}");
}

#[test]
fn managed_env_is_refused() {
    let e = parse("[backend.env]\nJWT_SECRET = \"x\"\n").expect_err("managed");
    assert!(e.0.contains("backend.env.JWT_SECRET"), "{e}");
}

#[test]
fn acme_challenge_uses_the_acme_names() {
    let c = parse("[tls]\nacme_challenge = \"http-01\"\n").expect("http-01");
    assert_eq!(c.tls.acme_challenge, AcmeChallenge::Http01);
    let c = parse("[tls]\nacme_challenge = \"tls-alpn-01\"\n").expect("tls-alpn-01");
    assert_eq!(c.tls.acme_challenge, AcmeChallenge::TlsAlpn01);
    assert!(parse("[tls]\nacme_challenge = \"dns-01\"\n").is_err());
}

#[test]
fn external_postgres_keys_fit_together() {
    let c = parse(
        "[postgres]\nmode = \"external\"\nurl = \"postgresql://k@db.example.be/kp?sslmode=verify-full\"\npassword_file = \"pw\"\n",
    )
    .expect("valid");
    assert_eq!(c.postgres.mode, PgMode::External);
    let u = c.postgres.external.as_ref().expect("parsed");
    assert_eq!(
        (u.host.as_str(), u.dbname.as_str()),
        ("db.example.be", "kp")
    );
    assert_eq!(
        c.postgres.password_file,
        Some(PathBuf::from("/etc/koprogo/pw"))
    );

    let e = parse("[postgres]\nurl = \"postgresql://k:hunter2@h/d\"\n").expect_err("no mode");
    assert!(
        e.0.contains("postgres.url") && e.0.contains("mode = \"external\""),
        "{e}"
    );
    assert!(!e.0.contains("hunter2"), "password shown: {e}");

    let e = parse("[postgres]\nmode = \"external\"\n").expect_err("no url");
    assert!(
        e.0.contains("postgres.mode") && e.0.contains("postgres.url"),
        "{e}"
    );

    let e = parse("[postgres]\nmode = \"external\"\nurl = \"postgresql://k:hunter2@h:x/d\"\n")
        .expect_err("bad port");
    assert!(e.0.contains("postgres.url") && e.0.contains("port"), "{e}");
    assert!(!e.0.contains("hunter2"), "password shown: {e}");

    let e = parse(
        "[postgres]\nmode = \"external\"\nurl = \"postgresql://k:pw@h/d\"\npassword_file = \"f\"\n",
    )
    .expect_err("two passwords");
    assert!(e.0.contains("postgres.password_file"), "{e}");

    let e = parse("[postgres]\npassword_file = \"f\"\n").expect_err("file without external");
    assert!(e.0.contains("postgres.password_file"), "{e}");

    let e = parse("[postgres]\nmode = \"cloud\"\n").expect_err("bad mode");
    assert!(e.0.contains("mode"), "{e}");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("10MiB"), Ok(10 << 20));
    assert_eq!(parse_size("512mb"), Ok(512 << 20));
    assert!(parse_size("ten").is_err());
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5 weeks").is_err());
    let c = parse("[postgres]\nmemory = \"1GiB\"\nstop_timeout = \"90s\"\n").expect("valid");
    assert_eq!(c.postgres.memory, MemoryBudget::Bytes(1 << 30));
    assert_eq!(c.postgres.stop_timeout, Duration::from_secs(90));
}

#[test]
fn capacity_interval() {
    assert_eq!(
        parse("").expect("default").capacity.interval,
        Duration::from_secs(300)
    );
    let c = parse("[capacity]\ninterval = \"2s\"\n").expect("2s");
    assert_eq!(c.capacity.interval, Duration::from_secs(2));
    let e = parse("[capacity]\ninterval = \"0s\"\n").expect_err("0s");
    assert!(e.0.contains("capacity.interval"), "{e}");
}

#[test]
fn tunnel_idle_timeout_is_bounded() {
    let c = parse("").expect("default");
    assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(600));
    let c = parse("[proxy]\ntunnel_idle_timeout = \"2s\"\n").expect("2s");
    assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(2));
    for bad in ["\"0s\"", "\"500ms\"", "\"2d\""] {
        let e = parse(&format!("[proxy]\ntunnel_idle_timeout = {bad}\n")).expect_err(bad);
        assert!(
            e.0.contains("test.toml: proxy.tunnel_idle_timeout") && e.0.contains("1s-24h"),
            "{e}"
        );
    }
    let e = parse("[proxy]\ntunnel_idle_timeout = \"ten minutes\"\n").expect_err("text");
    assert!(e.0.contains("tunnel_idle_timeout"), "{e}");
}

#[test]
fn overflowing_sizes_and_durations_are_errors() {
    assert!(parse_size("99999999999G").is_err());
    assert!(parse_duration("999999999999999d").is_err());
    assert!(parse_duration("200000000000s").is_err());
    assert_eq!(
        parse_duration("36500d"),
        Ok(Duration::from_secs(36500 * 86400))
    );
    for (toml, key, why) in [
        (
            "[logs]\nmax_size = \"99999999999G\"\n",
            "max_size",
            "too large",
        ),
        (
            "[proxy]\nmax_upload = \"17179869184G\"\n",
            "max_upload",
            "too large",
        ),
        (
            "[postgres]\nmemory = \"99999999999G\"\n",
            "memory",
            "too large",
        ),
        (
            "[logs]\nmax_age = \"999999999999999d\"\n",
            "max_age",
            "too long",
        ),
        ("[backup]\nmax_age = \"36501d\"\n", "max_age", "too long"),
        ("[proxy]\nhsts = 99999999999999\n", "hsts", "too long"),
    ] {
        let e = parse(toml).expect_err(toml);
        assert!(
            e.0.contains("/etc/koprogo/test.toml") && e.0.contains(key) && e.0.contains(why),
            "{toml}: {e}"
        );
    }
}

// The debconf-managed layer (debconf.toml beside the main file).

const MAIN: &str = "/etc/koprogo/koprogo.toml";
const MANAGED: &str = "/etc/koprogo/debconf.toml";

fn layered(main: &str, managed: &str) -> Result<Config, ConfigError> {
    Config::parse_layered(main, Path::new(MAIN), Some((managed, Path::new(MANAGED))))
}

const ANSWERS: &str = "domain = \"syndic.example.be\"\n[tls]\nmode = \"internal\"\n\
    [backend.smtp]\nenabled = true\nhost = \"smtp.example.be\"\nport = 587\n\
    username = \"u\"\npassword = \"p\\\"q\"\nfrom_email = \"noreply@example.be\"\n";

#[test]
fn managed_answers_apply_where_the_main_file_is_silent() {
    let c = layered("[logs]\nkeep_files = 3\n", ANSWERS).expect("valid");
    assert_eq!(c.domain, "syndic.example.be");
    assert_eq!(c.tls.mode, TlsMode::Internal);
    assert!(c.backend.smtp.enabled);
    assert_eq!(c.backend.smtp.password.as_deref(), Some("p\"q"));
    assert_eq!(c.logs.keep_files, 3);
    assert_eq!(c.origin("domain"), Path::new(MANAGED));
    assert_eq!(c.origin("backend.smtp.host"), Path::new(MANAGED));
    assert_eq!(c.origin("logs.keep_files"), Path::new(MAIN));
    // Keys set nowhere are the main file's (its defaults).
    assert_eq!(c.origin("proxy.http"), Path::new(MAIN));
    let m = c.managed.as_ref().expect("managed");
    assert_eq!(m.file, PathBuf::from(MANAGED));
    assert!(m.keys.contains("tls.mode") && !m.keys.contains("logs.keep_files"));
}

#[test]
fn the_main_file_wins_key_by_key_not_table_by_table() {
    let main = "domain = \"admin.example.be\"\n[backend.smtp]\nport = 2525\n[tls]\nacme_email = \"a@example.be\"\n";
    let c = layered(main, ANSWERS).expect("valid");
    assert_eq!(c.domain, "admin.example.be");
    assert_eq!(c.origin("domain"), Path::new(MAIN));
    // The SMTP table merges: the port from the main file, the rest from the answers.
    assert_eq!(c.backend.smtp.port, Some(2525));
    assert_eq!(c.backend.smtp.host.as_deref(), Some("smtp.example.be"));
    assert_eq!(c.origin("backend.smtp.port"), Path::new(MAIN));
    assert_eq!(c.origin("backend.smtp.host"), Path::new(MANAGED));
    // tls.mode stays the answer's ("internal"), beside the main file's e-mail.
    assert_eq!(c.tls.mode, TlsMode::Internal);
    assert_eq!(c.tls.acme_email.as_deref(), Some("a@example.be"));
    // A main file that turns SMTP off wins over an answer that turned it on.
    let c = layered("[backend.smtp]\nenabled = false\n", ANSWERS).expect("valid");
    assert!(!c.backend.smtp.enabled);
    // Arrays replace, they do not append.
    let c = layered(
        "aliases = [\"b.example.be\"]\n",
        "aliases = [\"a.example.be\"]\n",
    )
    .expect("valid");
    assert_eq!(c.aliases, vec!["b.example.be".to_string()]);
}

#[test]
fn unknown_keys_and_types_name_their_own_file() {
    let e = layered("", "[tls]\nmdoe = \"acme\"\n").expect_err("unknown in managed");
    assert!(e.0.starts_with(MANAGED) && e.0.contains("mdoe"), "{e}");
    let e = layered("[tls]\nmdoe = \"acme\"\n", ANSWERS).expect_err("unknown in main");
    assert!(e.0.starts_with(MAIN) && e.0.contains("mdoe"), "{e}");
    let e = layered("", "[backend.smtp]\nport = \"587\"\n").expect_err("type in managed");
    assert!(e.0.starts_with(MANAGED) && e.0.contains("port"), "{e}");
    let e = layered("", "domain = \"a\nb\"\n").expect_err("syntax in managed");
    assert!(e.0.starts_with(MANAGED), "{e}");
}

#[test]
fn a_bad_value_is_reported_in_the_file_it_came_from() {
    let bad_from = ANSWERS.replace("noreply@example.be", "no reply");
    let e = layered("", &bad_from).expect_err("managed from_email");
    assert!(
        e.0.starts_with(&format!("{MANAGED}: backend.smtp.from_email")),
        "{e}"
    );
    let e = layered("[backend.smtp]\nfrom_email = \"no reply\"\n", ANSWERS)
        .expect_err("main from_email");
    assert!(
        e.0.starts_with(&format!("{MAIN}: backend.smtp.from_email")),
        "{e}"
    );
    let e = layered("", "domain = \"a b\"\n").expect_err("managed domain");
    assert!(e.0.starts_with(&format!("{MANAGED}: domain")), "{e}");
    // A key missing in both files: the file of the key that asked for it.
    let e = layered("", "[backend.smtp]\nenabled = true\nhost = \"h\"\n").expect_err("no user");
    assert!(
        e.0.starts_with(&format!("{MANAGED}: backend.smtp.username")),
        "{e}"
    );
    let e = layered("[backend.smtp]\nenabled = true\n", "").expect_err("no host");
    assert!(
        e.0.starts_with(&format!("{MAIN}: backend.smtp.host")),
        "{e}"
    );
    let e = layered("", "[tls]\nmode = \"acme\"\n").expect_err("acme without e-mail");
    assert!(
        e.0.starts_with(&format!("{MANAGED}: tls.acme_email")),
        "{e}"
    );
}

#[test]
fn load_reads_the_managed_file_beside_the_main_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("koprogo.toml");
    std::fs::write(&main, "[logs]\nkeep_files = 3\n").expect("write main");
    let c = Config::load(&main).expect("without a managed file");
    assert!(c.managed.is_none());
    assert_eq!(c.domain, "localhost");
    let managed = dir.path().join(MANAGED_FILE);
    std::fs::write(&managed, ANSWERS).expect("write managed");
    let c = Config::load(&main).expect("with a managed file");
    assert_eq!(c.domain, "syndic.example.be");
    assert_eq!(c.origin("domain"), managed.as_path());
    assert_eq!(c.logs.keep_files, 3);
    std::fs::write(&managed, "[logs]\nkeep_flies = 1\n").expect("write bad");
    let e = Config::load(&main).expect_err("unknown key");
    assert!(
        e.0.starts_with(&managed.display().to_string()) && e.0.contains("keep_flies"),
        "{e}"
    );
    std::fs::remove_file(&managed).expect("rm");
    std::fs::create_dir(&managed).expect("a directory in its place");
    let e = Config::load(&main).expect_err("unreadable");
    assert!(
        e.0.starts_with(&managed.display().to_string()) && e.0.contains("dpkg-reconfigure"),
        "{e}"
    );
}
