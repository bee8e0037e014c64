//! The pbs configuration (config/src/lib.rs, schedule.rs, locate.rs): TOML, its
//! validation and the error positions, then what the daemon computes from an accepted
//! configuration (next run times, periods, windows, paths). Nothing may panic; every
//! error names the file.
#![no_main]

use chrono::{TimeZone, Utc};
use haul_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, "pbs.toml") {
        Ok(c) => c,
        Err(e) => {
            assert!(e.0.starts_with("config pbs.toml:"), "{e}");
            return;
        }
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 1, 12, 3, 0).unwrap();
    let _ = config.feed_link();
    let _ = config.server.schedule.next_after(Some(now), now, 1.0);
    for h in &config.hosts {
        let s = h.schedule(&config);
        for (last, jitter) in [(None, 0.0), (Some(now), 1.0), (Some(now), 0.5)] {
            assert!(s.next_after(last, now, jitter) >= now - chrono::Duration::seconds(1));
        }
        let _ = s.period();
        let _ = h.alert_window(&config);
        let _ = h.retention(&config);
        let _ = h.repository_path(&config);
        assert!(config.host(&h.name).is_some());
    }
});
