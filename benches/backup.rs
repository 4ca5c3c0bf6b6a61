//! Backup and restore figures for a database of realistic size: 1,000 condominiums
//! of synthetic KoproGo-like data made with SQL (units, owners, expenses, payments,
//! meeting minutes and other documents with French text, plus the demo backend's
//! items) and 2,000 uploaded files of incompressible bytes (scans, photos). Prints
//! sizes and times of `backup create`, `backup verify` and `restore`, and how long
//! the API did not answer during the restore. Run with `scripts/bench.sh backup`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Appliance;

const CONDOMINIUMS: u32 = 1000;
const UPLOADS: u32 = 2000;
const UPLOAD_BYTES: usize = 50 * 1024;

const SCHEMA: &str = r#"
CREATE TABLE condominiums (id serial PRIMARY KEY, name text NOT NULL, address text, city text,
  postal_code text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE units (id serial PRIMARY KEY, condominium_id int NOT NULL REFERENCES condominiums,
  number text, floor int, surface numeric(8,2), quota numeric(10,4));
CREATE TABLE owners (id serial PRIMARY KEY, unit_id int NOT NULL REFERENCES units,
  first_name text, last_name text, email text, phone text, iban text);
CREATE TABLE expenses (id bigserial PRIMARY KEY, condominium_id int NOT NULL REFERENCES condominiums,
  spent_on date, category text, description text, amount numeric(12,2), supplier text);
CREATE TABLE payments (id bigserial PRIMARY KEY, owner_id int NOT NULL REFERENCES owners,
  amount numeric(12,2), paid_at timestamptz, reference text);
CREATE TABLE documents (id bigserial PRIMARY KEY, condominium_id int NOT NULL REFERENCES condominiums,
  kind text, title text, body text, created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON units (condominium_id);
CREATE INDEX ON owners (unit_id);
CREATE INDEX ON expenses (condominium_id, spent_on);
CREATE INDEX ON payments (owner_id);
CREATE INDEX ON documents (condominium_id);
"#;

fn data_sql(n: u32) -> String {
    format!(
        r#"
CREATE TEMP TABLE words AS SELECT ARRAY['assemblée','générale','copropriété','syndic','charges',
  'travaux','toiture','ascenseur','chauffage','décompte','provision','fonds','réserve','résolution',
  'majorité','propriétaire','lot','quote-part','budget','entretien','façade','contrat','assurance',
  'sinistre','procès-verbal','vote','approuvé','commissaire','comptes','exercice','le','la','les',
  'de','du','des','et','pour','avec','sur'] AS a;
CREATE TEMP TABLE paras AS
  SELECT i AS id, (SELECT string_agg(w.a[1 + floor(random() * 40)::int], ' ')
                     FROM words w, generate_series(1, 120 + (i % 80))) || '.' AS t
    FROM generate_series(1, 20000) i;
ALTER TABLE paras ADD PRIMARY KEY (id);
INSERT INTO condominiums (name, address, city, postal_code)
  SELECT 'Résidence ' || i, i || ' rue ' || substr(md5(i::text), 1, 10), (ARRAY['Bruxelles','Liège',
    'Namur','Gent','Antwerpen'])[1 + i % 5], (1000 + i * 7 % 9000)::text FROM generate_series(1, {n}) i;
INSERT INTO units (condominium_id, number, floor, surface, quota)
  SELECT c, 'A' || u, u / 4, 40 + random() * 80, 1000.0 / 25
    FROM generate_series(1, {n}) c, generate_series(1, 25) u;
INSERT INTO owners (unit_id, first_name, last_name, email, phone, iban)
  SELECT 1 + (i % ({n} * 25)), 'Prénom' || i, 'Nom-' || md5(i::text), 'owner' || i || '@example.be',
    '+32 4' || lpad((i * 7919 % 10000000)::text, 8, '0'), 'BE' || lpad((i::bigint * 104729 % 100000000000000)::text, 14, '0')
    FROM generate_series(1, {n} * 30) i;
INSERT INTO expenses (condominium_id, spent_on, category, description, amount, supplier)
  SELECT 1 + i % {n}, date '2023-01-01' + (i % 1000), (ARRAY['entretien','énergie','assurance',
    'travaux','honoraires','eau'])[1 + i % 6], p.t, round((random() * 5000)::numeric, 2),
    'Fournisseur ' || (i % 700)
    FROM generate_series(1, {n} * 200) i JOIN paras p ON p.id = 1 + i % 20000;
UPDATE expenses SET description = left(description, 80 + (id % 200)::int);
INSERT INTO payments (owner_id, amount, paid_at, reference)
  SELECT 1 + i % ({n} * 30), round((random() * 800)::numeric, 2),
    timestamptz '2023-01-01' + (i % 1000) * interval '1 day', '+++' || lpad(i::text, 12, '0') || '+++'
    FROM generate_series(1, {n} * 400) i;
INSERT INTO documents (condominium_id, kind, title, body)
  SELECT 1 + d % {n}, (ARRAY['procès-verbal','convocation','décompte','contrat'])[1 + d % 4],
    'Document ' || d,
    (SELECT string_agg(p.t, E'\n\n') FROM paras p
      WHERE p.id BETWEEN (d * 7 % 19990) + 1 AND (d * 7 % 19990) + 8)
    FROM generate_series(1, {n} * 12) d;
INSERT INTO items (body)
  SELECT left(p.t || ' ' || q.t, 300 + (i % 2700)) FROM generate_series(1, {n} * 30) i
    JOIN paras p ON p.id = 1 + i % 20000 JOIN paras q ON q.id = 1 + (i * 13) % 20000;
ANALYZE;
"#
    )
}

fn psql(a: &Appliance, sql: &str) -> String {
    let (code, out, err) = a.cli(&["psql", "--", "-v", "ON_ERROR_STOP=1", "-qtAc", sql]);
    assert_eq!(code, 0, "psql: {err}");
    out.trim().to_string()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn counts(a: &Appliance) -> String {
    psql(
        a,
        "SELECT (SELECT count(*) FROM condominiums) || '/' || (SELECT count(*) FROM units) || '/' ||
                (SELECT count(*) FROM owners) || '/' || (SELECT count(*) FROM expenses) || '/' ||
                (SELECT count(*) FROM payments) || '/' || (SELECT count(*) FROM documents) || '/' ||
                (SELECT count(*) FROM items)",
    )
}

fn main() {
    let mut a = Appliance::new("\n[backup]\nenabled = false\n");
    a.start();
    a.wait_ready();
    let t = Instant::now();
    psql(&a, SCHEMA);
    // psql -c runs one transaction; the temp tables live for the session.
    let sql = data_sql(CONDOMINIUMS);
    let (code, _, err) = a.cli(&["psql", "--", "-v", "ON_ERROR_STOP=1", "-q", "-c", &sql]);
    assert_eq!(code, 0, "data: {err}");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let up = a.path("state/uploads");
    let mut upload_bytes = 0u64;
    for i in 0..UPLOADS {
        let d = up.join(format!("condo-{:04}", i % CONDOMINIUMS));
        std::fs::create_dir_all(&d).expect("mkdir");
        let mut buf = vec![0u8; UPLOAD_BYTES];
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(d.join(format!("scan-{i:05}.pdf")), &buf).expect("upload");
        upload_bytes += buf.len() as u64;
    }
    let db_bytes: u64 = psql(&a, "SELECT pg_database_size('koprogo')")
        .parse()
        .unwrap_or(0);
    let rows_before = counts(&a);
    println!(
        "dataset: {CONDOMINIUMS} condominiums, rows condominiums/units/owners/expenses/payments/documents/items = {rows_before}"
    );
    println!(
        "dataset: database {:.0} MiB on disk, uploads {UPLOADS} files {:.0} MiB (made in {:.0}s)",
        mib(db_bytes),
        mib(upload_bytes),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let (code, out, err) = a.cli(&["backup", "create"]);
    assert_eq!(code, 0, "{out}{err}");
    let create_secs = t.elapsed().as_secs_f64();
    let file = koprogo::backup::newest(&a.path("state/backups")).expect("backup file");
    let size = std::fs::metadata(&file).expect("meta").len();
    let manifest_dump = {
        let f = std::fs::File::open(&file).expect("open");
        let mut ar = tar::Archive::new(f);
        let mut n = 0;
        for e in ar.entries().expect("tar").flatten() {
            if e.path_bytes().as_ref() == b"db.dump" {
                n = e.size();
            }
        }
        n
    };
    println!(
        "backup create: {create_secs:.1}s, file {:.0} MiB (db.dump {:.0} MiB + uploads), {:.0} MiB/s of database+uploads",
        mib(size),
        mib(manifest_dump),
        mib(db_bytes + upload_bytes) / create_secs
    );

    let t = Instant::now();
    let (code, out, err) = a.cli(&["backup", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    println!(
        "backup verify (every checksum + pg_restore into a scratch database + row counts): {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Wipe, then restore while a loop measures how long the API does not answer.
    psql(&a, "TRUNCATE items; DELETE FROM documents;");
    let stop = Arc::new(AtomicBool::new(false));
    let port = a.backend_port;
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut down: Option<Instant> = None;
            let mut longest = Duration::ZERO;
            let deadline = Instant::now() + Duration::from_secs(1800);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let ok = matches!(common::http(port, "GET", "/api/v1/items", ""), Ok((200, _)));
                match (ok, down) {
                    (false, None) => down = Some(Instant::now()),
                    (true, Some(s)) => {
                        longest = longest.max(s.elapsed());
                        down = None;
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(s) = down {
                longest = longest.max(s.elapsed());
            }
            longest
        })
    };
    let t = Instant::now();
    let (code, out, err) = a.cli(&["restore", file.to_str().expect("utf8")]);
    let restore_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let downtime = watcher.join().unwrap_or_default();
    assert_eq!(code, 0, "{out}{err}");
    a.wait_ready();
    let rows_after = counts(&a);
    assert_eq!(rows_after, rows_before, "restored rows");
    println!(
        "restore (check + safety backup + pg_restore + swap + API restart): {restore_secs:.1}s, \
         API unavailable {:.2}s",
        downtime.as_secs_f64()
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
