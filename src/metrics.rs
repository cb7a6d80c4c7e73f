//! Multiclass evaluation of a classifier head's probability output.
//!
//! The numbers are meant to be directly comparable with Spark MLlib's
//! `MulticlassMetrics` (what `MulticlassClassificationEvaluator` reports), so
//! the definitions follow its source rather than any textbook variant:
//!
//! * `precision(c) = tp(c) / (tp(c) + fp(c))`, and **0** when `c` was never
//!   predicted (`tp + fp == 0`), exactly as MLlib does.
//! * `recall(c) = tp(c) / support(c)`. MLlib never evaluates recall for a
//!   class absent from the labels (it only iterates over labels it saw); such
//!   a class has weight 0 in every weighted average, so we report its recall
//!   as 0 (scikit-learn's `zero_division=0`) instead of NaN.
//! * `f1(c) = 2 p r / (p + r)` from that class's own precision and recall, and
//!   0 when `p + r == 0`.
//! * `weighted_X = Σ_c X(c) · support(c) / n`. Weighted recall therefore equals
//!   accuracy (up to rounding): `Σ tp(c)/support(c) · support(c)/n = Σ tp / n`.
//! * `log_loss = mean(-ln p_true)` with `p_true` clipped to `[eps, 1 - eps]`,
//!   `eps = 1e-15` (MLlib's `logLoss` default; it uses `-log1p(-eps)` at the
//!   upper clip, which we mirror).
//!
//! The predicted class of a row is its argmax, ties going to the lowest class
//! index, so results are deterministic whatever the float noise in a softmax.

use serde::Serialize;

/// MLlib's default `logLoss` epsilon. Without a clip a single confident
/// mistake with `p_true == 0` would make the mean infinite.
const LOG_LOSS_EPS: f64 = 1e-15;

/// Metrics of one class, in the head's class order.
#[derive(Debug, Clone, Serialize)]
pub struct ClassMetrics {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of rows whose true class is this one.
    pub support: usize,
}

/// The full evaluation of a labelled set of predictions.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub rows: usize,
    pub accuracy: f64,
    pub weighted_precision: f64,
    pub weighted_recall: f64,
    pub weighted_f1: f64,
    pub log_loss: f64,
    pub per_class: Vec<ClassMetrics>,
    pub classes: Vec<String>,
    /// `confusion[true][predicted]`, K x K in the head's class order.
    pub confusion: Vec<Vec<usize>>,
}

/// A misclassified row, as reported by [`most_confident_mistakes`].
#[derive(Debug, Clone, Serialize)]
pub struct Mistake {
    pub row: usize,
    pub truth: usize,
    pub predicted: usize,
    /// Probability the model gave to the (wrong) predicted class.
    pub probability: f64,
}

/// Index of the largest value; strict `>` makes ties go to the lowest index.
fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &p) in row.iter().enumerate().skip(1) {
        if p > row[best] {
            best = i;
        }
    }
    best
}

/// `-ln p` with MLlib's clipping of `p` to `[eps, 1 - eps]`.
fn clipped_neg_log(p: f64) -> f64 {
    if p < LOG_LOSS_EPS {
        -LOG_LOSS_EPS.ln()
    } else if p > 1.0 - LOG_LOSS_EPS {
        // log1p keeps the tiny loss of a near-certain right answer exact.
        -(-LOG_LOSS_EPS).ln_1p()
    } else {
        -p.ln()
    }
}

/// Evaluates predictions against the truth.
///
/// `classes` are the head's class names in output order (K of them), `truth`
/// holds one true class index per row and `probs` is the n x K row-major
/// probability matrix. Probabilities are not renormalised: a row is trusted
/// to sum to 1, but must not contain NaN or infinities.
///
/// Errors (a one-line message) on K < 1, no rows, a matrix whose size is not
/// n x K, a true index >= K, or a non-finite probability.
pub fn evaluate(classes: &[String], truth: &[usize], probs: &[f64]) -> Result<Evaluation, String> {
    let k = classes.len();
    if k == 0 {
        return Err("cannot evaluate: the head has no classes (need K >= 1)".to_string());
    }
    let n = truth.len();
    if n == 0 {
        return Err("cannot evaluate: no rows".to_string());
    }
    let expected = n
        .checked_mul(k)
        .ok_or_else(|| format!("cannot evaluate: {n} rows x {k} classes overflows"))?;
    if probs.len() != expected {
        return Err(format!(
            "cannot evaluate: {} probabilities given, expected {n} rows x {k} classes = {expected}",
            probs.len()
        ));
    }

    let mut confusion = vec![vec![0usize; k]; k];
    let mut loss_sum = 0.0;
    for (row, (&t, p)) in truth.iter().zip(probs.chunks_exact(k)).enumerate() {
        if t >= k {
            return Err(format!(
                "row {row}: true class index {t} is out of range for {k} classes"
            ));
        }
        if let Some(j) = p.iter().position(|v| !v.is_finite()) {
            // Debug-format the name so a stray newline cannot break the one-line message.
            return Err(format!(
                "row {row}: probability of class {:?} is {}",
                classes[j], p[j]
            ));
        }
        confusion[t][argmax(p)] += 1;
        loss_sum += clipped_neg_log(p[t]);
    }

    let nf = n as f64;
    let mut correct = 0usize;
    let mut per_class = Vec::with_capacity(k);
    let (mut w_precision, mut w_recall, mut w_f1) = (0.0, 0.0, 0.0);
    for (c, name) in classes.iter().enumerate() {
        let tp = confusion[c][c];
        let support: usize = confusion[c].iter().sum();
        let predicted: usize = confusion.iter().map(|r| r[c]).sum();
        correct += tp;

        let precision = if predicted == 0 {
            0.0
        } else {
            tp as f64 / predicted as f64
        };
        let recall = if support == 0 {
            0.0
        } else {
            tp as f64 / support as f64
        };
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };

        // Same association as MLlib (metric * count / total, then summed) so
        // the last bits match too, not just the maths.
        let weight = support as f64;
        w_precision += precision * weight / nf;
        w_recall += recall * weight / nf;
        w_f1 += f1 * weight / nf;

        per_class.push(ClassMetrics {
            class: name.clone(),
            precision,
            recall,
            f1,
            support,
        });
    }

    Ok(Evaluation {
        rows: n,
        accuracy: correct as f64 / nf,
        weighted_precision: w_precision,
        weighted_recall: w_recall,
        weighted_f1: w_f1,
        log_loss: loss_sum / nf,
        per_class,
        classes: classes.to_vec(),
        confusion,
    })
}

/// The `n` misclassified rows the model was most sure about: rows whose
/// argmax differs from the truth, by the predicted class's probability
/// descending, ties broken by row index ascending.
///
/// This does not validate its input (run [`evaluate`] for that): rows are
/// paired with `truth` as far as both go, an incomplete trailing row is
/// ignored, and rows containing NaN are skipped since they carry no usable
/// confidence. `k == 0` yields nothing.
pub fn most_confident_mistakes(truth: &[usize], probs: &[f64], k: usize, n: usize) -> Vec<Mistake> {
    if k == 0 || n == 0 {
        return Vec::new();
    }
    let mut mistakes: Vec<Mistake> = truth
        .iter()
        .zip(probs.chunks_exact(k))
        .enumerate()
        .filter(|(_, (_, p))| !p.iter().any(|v| v.is_nan()))
        .filter_map(|(row, (&t, p))| {
            let predicted = argmax(p);
            (predicted != t).then(|| Mistake {
                row,
                truth: t,
                predicted,
                probability: p[predicted],
            })
        })
        .collect();
    mistakes.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then(a.row.cmp(&b.row))
    });
    mistakes.truncate(n);
    mistakes
}

/// Lays out a table: the first column left-aligned (names), the others
/// right-aligned (numbers), every column as wide as its widest cell.
/// Widths count `char`s, which is also what std's `{:<w$}` padding counts,
/// so names with multi-byte characters stay aligned.
fn render_table(header: Vec<String>, rows: Vec<Vec<String>>) -> Vec<String> {
    // A class name may hold a newline or a tab (labels come from folder names and CSV fields):
    // written raw it would break the table's lines and columns.
    let one_line = |line: Vec<String>| -> Vec<String> {
        line.into_iter()
            .map(|cell| {
                if cell.chars().any(char::is_control) {
                    cell.chars()
                        .flat_map(|c| {
                            let escaped: Vec<char> = if c.is_control() {
                                c.escape_debug().collect()
                            } else {
                                vec![c]
                            };
                            escaped
                        })
                        .collect()
                } else {
                    cell
                }
            })
            .collect()
    };
    let header = one_line(header);
    let rows: Vec<Vec<String>> = rows.into_iter().map(one_line).collect();
    let columns = header.len();
    let mut widths = vec![0usize; columns];
    for line in std::iter::once(&header).chain(rows.iter()) {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(header)
        .chain(rows)
        .map(|line| {
            line.iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, &w))| {
                    if i == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect()
}

impl Evaluation {
    /// Human-readable report: a summary block (accuracy, weighted F1 /
    /// precision / recall, log loss, rows), a per-class table (class,
    /// precision, recall, F1, support) and the confusion matrix with class
    /// names as row and column headers. Plain text, no colours, ends with a
    /// newline.
    pub fn to_table(&self) -> String {
        let mut out = vec!["Summary".to_string()];
        let summary = [
            ("accuracy", format!("{:.4}", self.accuracy)),
            ("weighted F1", format!("{:.4}", self.weighted_f1)),
            (
                "weighted precision",
                format!("{:.4}", self.weighted_precision),
            ),
            ("weighted recall", format!("{:.4}", self.weighted_recall)),
            ("log loss", format!("{:.4}", self.log_loss)),
            ("rows", self.rows.to_string()),
        ];
        out.extend(
            render_table(
                vec![String::new(), String::new()],
                summary
                    .into_iter()
                    .map(|(k, v)| vec![k.to_string(), v])
                    .collect(),
            )
            .into_iter()
            // The blank header row only exists to share the layout code.
            .skip(1)
            .map(|l| format!("  {l}")),
        );

        out.push(String::new());
        out.push("Per class".to_string());
        out.extend(render_table(
            ["class", "precision", "recall", "F1", "support"]
                .map(String::from)
                .to_vec(),
            self.per_class
                .iter()
                .map(|m| {
                    vec![
                        m.class.clone(),
                        format!("{:.4}", m.precision),
                        format!("{:.4}", m.recall),
                        format!("{:.4}", m.f1),
                        m.support.to_string(),
                    ]
                })
                .collect(),
        ));

        out.push(String::new());
        out.push("Confusion matrix (rows: true class, columns: predicted class)".to_string());
        let mut header = vec!["true \\ predicted".to_string()];
        header.extend(self.classes.iter().cloned());
        out.extend(render_table(
            header,
            self.classes
                .iter()
                .zip(&self.confusion)
                .map(|(name, counts)| {
                    std::iter::once(name.clone())
                        .chain(counts.iter().map(usize::to_string))
                        .collect()
                })
                .collect(),
        ));

        let mut text = out.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    /// The hand-worked 3-class example (also checked once against
    /// scikit-learn 1.9.1's precision_recall_fscore_support(average='weighted',
    /// zero_division=0), accuracy_score and log_loss).
    ///
    /// row truth probs              argmax  p_true
    ///  0   a    [.7  .2  .1 ]      a       .7
    ///  1   a    [.5  .25 .25]      a       .5
    ///  2   a    [.3  .6  .1 ]      b       .3
    ///  3   b    [.1  .8  .1 ]      b       .8
    ///  4   b    [.2  .3  .5 ]      c       .3
    ///  5   c    [.25 .25 .5 ]      c       .5
    ///
    /// confusion (true x pred): a [2 1 0], b [0 1 1], c [0 0 1]
    /// a: tp 2, predicted 2, support 3 -> P 1,   R 2/3, F1 2·(2/3)/(5/3) = 4/5
    /// b: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    /// c: tp 1, predicted 2, support 1 -> P 1/2, R 1,   F1 1/(3/2) = 2/3
    /// accuracy = 4/6 = 2/3
    /// weighted P  = (3·1 + 2·1/2 + 1·1/2) / 6 = 4.5/6 = 3/4
    /// weighted R  = (3·2/3 + 2·1/2 + 1·1) / 6 = 4/6 = 2/3 (= accuracy)
    /// weighted F1 = (3·4/5 + 2·1/2 + 1·2/3) / 6 = (61/15) / 6 = 61/90
    /// log loss = -ln(.7·.5·.3·.8·.3·.5) / 6 = -ln(0.0126) / 6 ≈ 0.7290097
    fn example() -> (Vec<String>, Vec<usize>, Vec<f64>) {
        let probs = vec![
            0.7, 0.2, 0.1, //
            0.5, 0.25, 0.25, //
            0.3, 0.6, 0.1, //
            0.1, 0.8, 0.1, //
            0.2, 0.3, 0.5, //
            0.25, 0.25, 0.5,
        ];
        (names(&["a", "b", "c"]), vec![0, 0, 0, 1, 1, 2], probs)
    }

    #[test]
    fn hand_computed_three_classes() {
        let (classes, truth, probs) = example();
        let e = evaluate(&classes, &truth, &probs).unwrap();
        assert_eq!(e.rows, 6);
        close(e.accuracy, 2.0 / 3.0);
        close(e.weighted_precision, 0.75);
        close(e.weighted_recall, 2.0 / 3.0);
        close(e.weighted_f1, 61.0 / 90.0);
        close(e.log_loss, -(0.0126f64).ln() / 6.0);
        close(e.log_loss, 0.729_009_744_170_784_1);

        let expected = [
            ("a", 1.0, 2.0 / 3.0, 0.8, 3),
            ("b", 0.5, 0.5, 0.5, 2),
            ("c", 0.5, 1.0, 2.0 / 3.0, 1),
        ];
        assert_eq!(e.per_class.len(), 3);
        for (m, (name, p, r, f, s)) in e.per_class.iter().zip(expected) {
            assert_eq!(m.class, name);
            close(m.precision, p);
            close(m.recall, r);
            close(m.f1, f);
            assert_eq!(m.support, s);
        }
        assert_eq!(
            e.confusion,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        assert_eq!(e.classes, classes);
    }

    /// Class c is never predicted: MLlib gives it precision 0 (tp + fp == 0),
    /// hence recall 0 and F1 0, and still weights it by its support.
    /// truth [a a b b c c], pred [a a b b b a]
    /// a: tp 2, predicted 3 -> P 2/3, R 1, F1 (4/3)/(5/3) = 4/5
    /// b: tp 2, predicted 3 -> P 2/3, R 1, F1 4/5
    /// c: tp 0, predicted 0 -> P 0,   R 0, F1 0
    /// weighted P = (2·2/3 + 2·2/3 + 2·0) / 6 = 4/9
    /// weighted R = (2 + 2 + 0) / 6 = 2/3
    /// weighted F1 = (2·4/5 + 2·4/5) / 6 = 8/15
    #[test]
    fn never_predicted_class_has_zero_precision() {
        let classes = names(&["a", "b", "c"]);
        let truth = [0, 0, 1, 1, 2, 2];
        let probs = [
            0.8, 0.1, 0.1, //
            0.6, 0.3, 0.1, //
            0.1, 0.8, 0.1, //
            0.2, 0.7, 0.1, //
            0.1, 0.5, 0.4, //
            0.5, 0.1, 0.4,
        ];
        let e = evaluate(&classes, &truth, &probs).unwrap();
        let c = &e.per_class[2];
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 2));
        close(e.per_class[0].precision, 2.0 / 3.0);
        close(e.per_class[0].f1, 0.8);
        close(e.weighted_precision, 4.0 / 9.0);
        close(e.weighted_recall, 2.0 / 3.0);
        close(e.weighted_f1, 8.0 / 15.0);
        close(e.accuracy, e.weighted_recall);
    }

    /// A class that is predicted but never true has support 0, so it weighs
    /// nothing; its recall is reported as 0 rather than NaN.
    #[test]
    fn class_without_support_is_finite_and_weightless() {
        let classes = names(&["a", "b", "c"]);
        // truth [a b], pred [a c]
        let probs = [0.9, 0.05, 0.05, 0.1, 0.2, 0.7];
        let e = evaluate(&classes, &[0, 1], &probs).unwrap();
        let c = &e.per_class[2];
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 0));
        // a: P 1, R 1, F1 1 (weight 1/2); b: never predicted, 0 (weight 1/2).
        close(e.weighted_precision, 0.5);
        close(e.weighted_recall, 0.5);
        close(e.weighted_f1, 0.5);
        close(e.accuracy, 0.5);
    }

    #[test]
    fn perfect_predictions() {
        let classes = names(&["x", "y"]);
        let e = evaluate(&classes, &[0, 1, 1], &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]).unwrap();
        assert_eq!(e.accuracy, 1.0);
        assert_eq!(e.weighted_precision, 1.0);
        assert_eq!(e.weighted_recall, 1.0);
        assert_eq!(e.weighted_f1, 1.0);
        // p = 1 is clipped to 1 - 1e-15, as in MLlib: a loss of ~1e-15, not 0.
        assert!(e.log_loss >= 0.0 && e.log_loss < 2e-15, "{}", e.log_loss);
        assert_eq!(e.confusion, vec![vec![1, 0], vec![0, 2]]);
    }

    #[test]
    fn single_class_head() {
        let e = evaluate(&names(&["only"]), &[0, 0], &[1.0, 1.0]).unwrap();
        assert_eq!(e.accuracy, 1.0);
        assert_eq!(e.confusion, vec![vec![2]]);
    }

    #[test]
    fn log_loss_clips_zero_probability() {
        let classes = names(&["a", "b"]);
        // Row 0 gives the true class exactly 0: the loss is -ln(1e-15), not inf.
        let e = evaluate(&classes, &[0, 1], &[0.0, 1.0, 0.5, 0.5]).unwrap();
        let clipped = -(1e-15f64).ln();
        close(clipped, 34.538_776_394_910_684);
        close(e.log_loss, (clipped + 2f64.ln()) / 2.0);
        // A tiny positive probability below eps is clipped too.
        let e = evaluate(&classes, &[0], &[1e-300, 1.0]).unwrap();
        close(e.log_loss, clipped);
    }

    #[test]
    fn confusion_ties_go_to_lowest_index() {
        let classes = names(&["a", "b", "c"]);
        let third = 1.0 / 3.0;
        let probs = [
            0.4, 0.4, 0.2, // tie a/b -> a
            0.2, 0.4, 0.4, // tie b/c -> b
            third, third, third, // three-way tie -> a
            0.1, 0.2, 0.7, // c
        ];
        let e = evaluate(&classes, &[2, 2, 1, 2], &probs).unwrap();
        // true c: predicted a, b, c once each; true b: predicted a.
        assert_eq!(
            e.confusion,
            vec![vec![0, 0, 0], vec![1, 0, 0], vec![1, 1, 1]]
        );
        let total: usize = e.confusion.iter().flatten().sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn mistakes_of_the_example() {
        let (_, truth, probs) = example();
        let m = most_confident_mistakes(&truth, &probs, 3, 10);
        let got: Vec<_> = m
            .iter()
            .map(|m| (m.row, m.truth, m.predicted, m.probability))
            .collect();
        assert_eq!(got, vec![(2, 0, 1, 0.6), (4, 1, 2, 0.5)]);
    }

    #[test]
    fn mistakes_order_ties_and_truncation() {
        let truth = [0, 0, 1, 0, 1, 0];
        let probs = [
            0.3, 0.7, // row 0: wrong, 0.7
            0.9, 0.1, // row 1: right
            0.8, 0.2, // row 2: wrong, 0.8
            0.3, 0.7, // row 3: wrong, 0.7 (ties row 0)
            0.5, 0.5, // row 4: tie -> a, wrong, 0.5
            0.1, 0.9, // row 5: wrong, 0.9
        ];
        let rows = |n| -> Vec<usize> {
            most_confident_mistakes(&truth, &probs, 2, n)
                .iter()
                .map(|m| m.row)
                .collect()
        };
        assert_eq!(rows(10), vec![5, 2, 0, 3, 4]);
        assert_eq!(rows(3), vec![5, 2, 0]);
        assert_eq!(rows(0), Vec::<usize>::new());
        let all = most_confident_mistakes(&truth, &probs, 2, 10);
        assert_eq!(
            (all[4].truth, all[4].predicted, all[4].probability),
            (1, 0, 0.5)
        );
        assert!(most_confident_mistakes(&truth, &probs, 0, 10).is_empty());
    }

    #[test]
    fn table_contains_names_and_is_aligned() {
        let classes = names(&["cat", "a-very-long-class-name", "émeu"]);
        let truth = [0, 1, 2, 2];
        let probs = [
            0.9, 0.05, 0.05, //
            0.1, 0.8, 0.1, //
            0.1, 0.1, 0.8, //
            0.6, 0.2, 0.2,
        ];
        let e = evaluate(&classes, &truth, &probs).unwrap();
        let text = e.to_table();
        for name in &classes {
            assert!(text.contains(name.as_str()), "{name} missing:\n{text}");
        }
        for label in ["accuracy", "weighted F1", "log loss", "rows", "support"] {
            assert!(text.contains(label), "{label} missing:\n{text}");
        }
        assert!(!text.contains('\x1b'));

        let lines: Vec<&str> = text.lines().collect();
        let width = |l: &&str| l.chars().count();

        let conf = lines
            .iter()
            .position(|l| l.starts_with("true \\ predicted"))
            .unwrap();
        let conf_lines = &lines[conf..];
        assert_eq!(conf_lines.len(), 1 + classes.len());
        let w = width(&conf_lines[0]);
        assert!(conf_lines.iter().all(|l| width(l) == w), "{text}");
        // Rows start with their class name, in order.
        for (line, name) in conf_lines[1..].iter().zip(&classes) {
            assert!(line.starts_with(name.as_str()));
        }
        // Counts are right-aligned: the last column ends at the same char.
        assert!(conf_lines[3].ends_with('1'), "{text}");

        let per = lines.iter().position(|l| l.starts_with("class")).unwrap();
        let per_lines = &lines[per..per + 1 + classes.len()];
        let w = width(&per_lines[0]);
        assert!(per_lines.iter().all(|l| width(l) == w), "{text}");
    }

    #[test]
    fn errors_are_single_lines() {
        let two = names(&["a", "b"]);
        let cases = [
            evaluate(&[], &[0], &[1.0]),
            evaluate(&two, &[], &[]),
            evaluate(&two, &[0, 1], &[0.5, 0.5, 0.5]),
            evaluate(&two, &[0, 2], &[0.5, 0.5, 0.5, 0.5]),
            evaluate(&two, &[0, 1], &[0.5, 0.5, f64::NAN, 0.5]),
            evaluate(&two, &[0], &[f64::INFINITY, 0.5]),
        ];
        let needles = [
            "no classes",
            "no rows",
            "expected 2 rows x 2 classes",
            "out of range",
            "NaN",
            "inf",
        ];
        for (result, needle) in cases.into_iter().zip(needles) {
            let err = result.unwrap_err();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(!err.contains('\n'));
        }
        let err = evaluate(&two, &[1], &[f64::NAN, 0.5]).unwrap_err();
        assert!(err.starts_with("row 0:") && err.contains("\"a\""), "{err}");
    }

    #[test]
    fn serializes() {
        fn assert_serialize<T: Serialize>() {}
        assert_serialize::<Evaluation>();
        assert_serialize::<Mistake>();
        assert_serialize::<ClassMetrics>();
    }
}
