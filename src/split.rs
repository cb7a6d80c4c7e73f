//! Splitting a feature table into train/test (or more) parts.
//!
//! Two ways, both deterministic:
//! - stratified by label with a seed: each class is shuffled and cut in the requested
//!   proportions, so every part keeps the class balance (MLlib's `randomSplit` does not
//!   stratify; on 200 images a class an unstratified split can be badly skewed);
//! - by hash of the path (TF-Hub's `retrain.py` trick): a file's side depends only on its path,
//!   so it never changes side when files are added and a test set stays a test set.
//!
//! The shuffle uses a hand-written SplitMix64 generator: a split is data that users commit to
//! and compare across machines, so its sequence must never change with a dependency update,
//! which `rand`'s documentation does not promise for its algorithms.

use sha2::{Digest, Sha256};

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, statistically sound for shuffling, and its
/// output for a seed is fixed forever.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for any n we use).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Validates and normalises split fractions (they may be given as weights, like
/// `randomSplit`'s: `3,1` is `0.75,0.25`).
pub fn normalise_fractions(fractions: &[f64]) -> Result<Vec<f64>, String> {
    if fractions.len() < 2 {
        return Err("--fractions needs at least two parts (e.g. 0.6,0.4)".into());
    }
    if let Some(f) = fractions.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(format!("--fractions: {f} is not a positive number"));
    }
    let total: f64 = fractions.iter().sum();
    Ok(fractions.iter().map(|f| f / total).collect())
}

/// How many of `n` items each part gets: floor of the exact share, then the leftover items go
/// to the parts with the largest remainders (ties to the earlier part). Sums to `n` exactly.
pub fn apportion(n: usize, fractions: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = fractions.iter().map(|f| f * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = n - counts.iter().sum::<usize>().min(n);
    let mut order: Vec<usize> = (0..fractions.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// Part index for each row: within each label the rows are shuffled with `seed` and cut in
/// proportion. Rows keep their original order inside each part.
pub fn stratified(labels: &[String], fractions: &[f64], seed: u64) -> Vec<usize> {
    let mut by_label: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l.as_str()).or_default().push(i);
    }
    let mut part = vec![0usize; labels.len()];
    for (label, mut rows) in by_label {
        // One generator per class, seeded from the label too: adding a class to the data
        // does not reshuffle the others.
        let mut rng = SplitMix64::new(seed ^ fnv1a(label.as_bytes()));
        rng.shuffle(&mut rows);
        let counts = apportion(rows.len(), fractions);
        let mut start = 0;
        for (p, &c) in counts.iter().enumerate() {
            for &r in &rows[start..start + c] {
                part[r] = p;
            }
            start += c;
        }
    }
    part
}

/// Part index for each row from the SHA-256 of its path alone.
pub fn by_hash(paths: &[String], fractions: &[f64]) -> Vec<usize> {
    let mut bounds = Vec::with_capacity(fractions.len());
    let mut acc = 0.0;
    for f in fractions {
        acc += f;
        bounds.push(acc);
    }
    paths
        .iter()
        .map(|p| {
            let digest = Sha256::digest(p.as_bytes());
            let x =
                u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / 2f64.powi(64);
            bounds
                .iter()
                .position(|&b| x < b)
                .unwrap_or(fractions.len() - 1)
        })
        .collect()
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_sequence_is_fixed() {
        // Reference values of SplitMix64 with seed 0 (from the published C implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn apportion_sums_and_rounds_fairly() {
        assert_eq!(apportion(10, &[0.6, 0.4]), vec![6, 4]);
        assert_eq!(apportion(5, &[0.6, 0.4]), vec![3, 2]);
        assert_eq!(apportion(7, &[1.0 / 3.0; 3]), vec![3, 2, 2]);
        assert_eq!(apportion(1, &[0.5, 0.5]), vec![1, 0]);
        assert_eq!(apportion(0, &[0.5, 0.5]), vec![0, 0]);
        for n in 0..50 {
            assert_eq!(apportion(n, &[0.7, 0.2, 0.1]).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn stratified_keeps_class_balance_and_is_deterministic() {
        let labels: Vec<String> = (0..300)
            .map(|i| if i % 3 == 0 { "a" } else { "b" }.to_string())
            .collect();
        let fr = normalise_fractions(&[0.6, 0.4]).unwrap();
        let p1 = stratified(&labels, &fr, 7);
        assert_eq!(p1, stratified(&labels, &fr, 7));
        assert_ne!(p1, stratified(&labels, &fr, 8));
        let count = |label: &str, part: usize| {
            (0..300)
                .filter(|&i| labels[i] == label && p1[i] == part)
                .count()
        };
        assert_eq!((count("a", 0), count("a", 1)), (60, 40));
        assert_eq!((count("b", 0), count("b", 1)), (120, 80));
    }

    #[test]
    fn hash_split_is_stable_when_rows_are_added() {
        let fr = normalise_fractions(&[3.0, 1.0]).unwrap();
        let paths: Vec<String> = (0..1000).map(|i| format!("img/{i}.jpg")).collect();
        let parts = by_hash(&paths, &fr);
        let more: Vec<String> = (0..1500).map(|i| format!("img/{i}.jpg")).collect();
        assert_eq!(&by_hash(&more, &fr)[..1000], &parts[..]);
        let test = parts.iter().filter(|&&p| p == 1).count();
        assert!((200..300).contains(&test), "{test} of 1000 in the 25% part");
    }

    #[test]
    fn bad_fractions() {
        assert!(normalise_fractions(&[1.0]).is_err());
        assert!(normalise_fractions(&[0.5, 0.0]).is_err());
        assert!(normalise_fractions(&[0.5, f64::NAN]).is_err());
        assert_eq!(normalise_fractions(&[3.0, 1.0]).unwrap(), vec![0.75, 0.25]);
    }
}
