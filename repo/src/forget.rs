//! Retention: which snapshots a keep policy keeps, and forgetting the others.
//!
//! The rules are restic's and borg's: snapshots are grouped by host and paths; in each
//! group, newest first, `keep_last` keeps the N newest, and `keep_hourly` / `daily` /
//! `weekly` / `monthly` / `yearly` keep the newest snapshot of each of the N most recent
//! hours / days / ISO weeks / months / years that have one, in the given time zone. A
//! snapshot kept by any rule stays. The newest snapshot of a group always stays. An
//! empty policy keeps everything.
//!
//! Forgetting removes snapshot objects only; the data they alone referenced stays in
//! the packs until a prune reclaims it (prune needs an exclusive lock; forget, which
//! deletes nothing a running backup can depend on, takes a shared one).

use crate::format::snapshot::Snapshot;
use crate::{Repository, Result};
use chrono::{Datelike, TimeZone};
use haul_protocol::SnapshotId;
use std::collections::BTreeMap;

/// How many snapshots of each kind to keep (`None` or 0: the rule is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
}

impl KeepPolicy {
    /// No rule set: everything is kept.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| n.unwrap_or(0) == 0)
    }

    fn rules(&self) -> [(Rule, Option<u32>); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }
}

#[derive(Debug, Clone, Copy)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    /// The period a snapshot at `t` falls in, as shown in reasons.
    fn period<Tz: TimeZone>(self, t: &chrono::DateTime<Tz>, index: usize) -> String
    where
        Tz::Offset: std::fmt::Display,
    {
        match self {
            Rule::Last => format!("last {}", index + 1),
            Rule::Hourly => t.format("hourly %Y-%m-%d %H:00").to_string(),
            Rule::Daily => t.format("daily %Y-%m-%d").to_string(),
            Rule::Weekly => {
                let w = t.iso_week();
                format!("weekly {}-W{:02}", w.year(), w.week())
            }
            Rule::Monthly => t.format("monthly %Y-%m").to_string(),
            Rule::Yearly => t.format("yearly %Y").to_string(),
        }
    }
}

/// What the policy decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: SnapshotId,
    pub host: String,
    pub time: chrono::DateTime<chrono::Utc>,
    /// Why it stays (`daily 2024-01-02`, `newest`, ...); empty: it is forgotten.
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Applies `policy` to `snapshots` (any order), with periods in time zone `tz`.
/// Returns every snapshot's decision, newest first within each group.
pub fn plan<Tz: TimeZone>(
    snapshots: &[(SnapshotId, Snapshot)],
    policy: &KeepPolicy,
    tz: &Tz,
) -> Vec<Decision>
where
    Tz::Offset: std::fmt::Display,
{
    // By (host, sorted paths).
    type Group<'a> = Vec<&'a (SnapshotId, Snapshot)>;
    let mut groups: BTreeMap<(String, Vec<String>), Group> = BTreeMap::new();
    for s in snapshots {
        let mut paths = s.1.paths.clone();
        paths.sort();
        groups.entry((s.1.host.clone(), paths)).or_default().push(s);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(b.0.cmp(&a.0)));
        let mut left: Vec<(Rule, u32, Option<String>)> = policy
            .rules()
            .into_iter()
            .filter_map(|(r, n)| n.filter(|&n| n > 0).map(|n| (r, n, None)))
            .collect();
        for (i, (id, snap)) in group.iter().enumerate() {
            let local = snap.time.with_timezone(tz);
            let mut reasons = Vec::new();
            if policy.is_empty() {
                reasons.push("no retention policy".to_string());
            } else if i == 0 {
                reasons.push("newest".to_string());
            }
            for (rule, n, last) in left.iter_mut() {
                let period = rule.period(&local, i);
                if *n > 0 && last.as_deref() != Some(period.as_str()) {
                    *n -= 1;
                    reasons.push(period.clone());
                    *last = Some(period);
                }
            }
            out.push(Decision {
                id: *id,
                host: snap.host.clone(),
                time: snap.time,
                reasons,
            });
        }
    }
    out
}

impl Repository {
    /// Removes the snapshots `ids` (under a shared lock: it deletes no data). Each must
    /// exist. Returns how many were removed.
    pub fn forget(&self, ids: &[SnapshotId]) -> Result<usize> {
        // Two prefixes of one snapshot name it once.
        let mut ids = ids.to_vec();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            return Ok(0);
        }
        let _lock = self.lock(crate::lock::LockKind::Shared, "forget")?;
        for id in &ids {
            // Named and readable: a typo or a foreign file is not silently "forgotten".
            self.load_snapshot(id)?;
        }
        for id in &ids {
            self.backend()
                .delete(crate::backend::FileType::Snapshot, &id.to_hex())?;
        }
        Ok(ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::{SourceKind, Summary};
    use chrono::Utc;

    fn snap(host: &str, time: &str) -> (SnapshotId, Snapshot) {
        let time: chrono::DateTime<Utc> = time.parse().unwrap();
        let s = Snapshot {
            time,
            host: host.into(),
            paths: vec!["/srv".into()],
            tags: vec![],
            tree: haul_protocol::TreeId([0; 32]),
            parent: None,
            source: SourceKind::Pull,
            summary: Summary::default(),
            original: None,
        };
        (SnapshotId::of(format!("{host}{time}").as_bytes()), s)
    }

    fn kept(d: &[Decision]) -> Vec<String> {
        let mut v: Vec<String> = d
            .iter()
            .filter(|d| d.keep())
            .map(|d| d.time.format("%m-%d %H").to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn daily_keeps_the_newest_of_each_of_the_last_days_that_have_one() {
        let snaps = vec![
            snap("a", "2024-01-01T10:00:00Z"),
            snap("a", "2024-01-01T22:00:00Z"),
            snap("a", "2024-01-02T09:00:00Z"),
            snap("a", "2024-01-04T09:00:00Z"),
            snap("a", "2024-01-04T11:00:00Z"),
        ];
        let d = plan(
            &snaps,
            &KeepPolicy {
                daily: Some(3),
                ..Default::default()
            },
            &Utc,
        );
        assert_eq!(kept(&d), ["01-01 22", "01-02 09", "01-04 11"]);
        let newest = d
            .iter()
            .find(|d| d.time.format("%d %H").to_string() == "04 11");
        assert_eq!(
            newest.unwrap().reasons,
            ["newest".to_string(), "daily 2024-01-04".to_string()]
        );
    }

    #[test]
    fn rules_combine_groups_are_separate_and_the_newest_always_stays() {
        let snaps = vec![
            snap("a", "2023-06-01T00:00:00Z"),
            snap("a", "2023-12-31T00:00:00Z"),
            snap("a", "2024-01-07T00:00:00Z"), // ISO week 2024-W01
            snap("a", "2024-01-08T00:00:00Z"), // W02
            snap("a", "2024-01-09T00:00:00Z"),
            snap("b", "2020-01-01T00:00:00Z"),
        ];
        let policy = KeepPolicy {
            last: Some(1),
            weekly: Some(2),
            yearly: Some(2),
            ..Default::default()
        };
        let d = plan(&snaps, &policy, &Utc);
        // a: last → 01-09; weekly → 01-09 (W02), 01-07 (W01); yearly → 01-09 (2024),
        // 12-31 (2023). b: its only snapshot is its newest.
        assert_eq!(kept(&d), ["01-01 00", "01-07 00", "01-09 00", "12-31 00"]);
        assert_eq!(d.len(), 6);
        // Only the hourly rule, fewer than there are: the newest still stays.
        let d = plan(
            &snaps[..2],
            &KeepPolicy {
                monthly: Some(1),
                ..Default::default()
            },
            &Utc,
        );
        assert_eq!(kept(&d), ["12-31 00"]);
    }

    #[test]
    fn an_empty_policy_keeps_everything_and_the_time_zone_decides_the_day() {
        let snaps = vec![
            snap("a", "2024-01-01T22:30:00Z"),
            snap("a", "2024-01-01T23:30:00Z"),
        ];
        assert!(plan(&snaps, &KeepPolicy::default(), &Utc)
            .iter()
            .all(Decision::keep));
        let daily = KeepPolicy {
            daily: Some(5),
            ..Default::default()
        };
        assert_eq!(kept(&plan(&snaps, &daily, &Utc)), ["01-01 23"]);
        // At UTC+01:00 the two fall on different days.
        let cet = chrono::FixedOffset::east_opt(3600).unwrap();
        assert_eq!(kept(&plan(&snaps, &daily, &cet)), ["01-01 22", "01-01 23"]);
    }
}
