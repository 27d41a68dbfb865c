//! A small line diff for `meshctl diff`: the longest common subsequence of
//! the two texts' lines, printed as `- removed`, `+ added` and `  kept`
//! lines, with runs of unchanged lines far from any change folded into
//! one `  ...` line. Resources are a few dozen lines, so the quadratic
//! table is cheap; above [`MAX_CELLS`] the diff degrades to "all old lines
//! removed, all new lines added" instead of using unbounded memory.

/// Largest LCS table (old lines × new lines) computed.
pub const MAX_CELLS: usize = 1 << 22;

/// Unchanged lines shown around each change.
pub const CONTEXT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'a> {
    Keep(&'a str),
    Remove(&'a str),
    Add(&'a str),
}

fn ops<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<Op<'a>> {
    let (n, m) = (old.len(), new.len());
    if n.saturating_mul(m) > MAX_CELLS {
        let mut out: Vec<Op> = old.iter().map(|l| Op::Remove(l)).collect();
        out.extend(new.iter().map(|l| Op::Add(l)));
        return out;
    }
    // lcs[i][j]: LCS length of old[i..] and new[j..], row-major.
    let width = m + 1;
    let mut lcs = vec![0u32; (n + 1) * width];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * width + j] = if old[i] == new[j] {
                lcs[(i + 1) * width + j + 1] + 1
            } else {
                lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n + m);
    while i < n && j < m {
        if old[i] == new[j] {
            out.push(Op::Keep(old[i]));
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * width + j] >= lcs[i * width + j + 1] {
            out.push(Op::Remove(old[i]));
            i += 1;
        } else {
            out.push(Op::Add(new[j]));
            j += 1;
        }
    }
    out.extend(old[i..].iter().map(|l| Op::Remove(l)));
    out.extend(new[j..].iter().map(|l| Op::Add(l)));
    out
}

/// The diff from `old` to `new`, one output line per line, each ending
/// with a newline; empty when the texts are equal.
pub fn line_diff(old: &str, new: &str) -> String {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    let ops = ops(&old, &new);
    if ops.iter().all(|op| matches!(op, Op::Keep(_))) {
        return String::new();
    }
    // Distance of every op to the nearest change (two linear passes), to
    // fold far context.
    let mut distance = vec![usize::MAX; ops.len()];
    let mut last = None;
    for (i, op) in ops.iter().enumerate() {
        if !matches!(op, Op::Keep(_)) {
            last = Some(i);
        }
        if let Some(c) = last {
            distance[i] = i - c;
        }
    }
    last = None;
    for (i, op) in ops.iter().enumerate().rev() {
        if !matches!(op, Op::Keep(_)) {
            last = Some(i);
        }
        if let Some(c) = last {
            distance[i] = distance[i].min(c - i);
        }
    }
    let near = |i: usize| distance[i] <= CONTEXT;
    let mut out = String::new();
    let mut folded = false;
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Keep(line) if near(i) => {
                folded = false;
                out.push_str("  ");
                out.push_str(line);
            }
            Op::Keep(_) => {
                if !folded {
                    out.push_str("  ...\n");
                    folded = true;
                }
                continue;
            }
            Op::Remove(line) => {
                folded = false;
                out.push_str("- ");
                out.push_str(line);
            }
            Op::Add(line) => {
                folded = false;
                out.push_str("+ ");
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert_eq!(line_diff("a\nb\n", "a\nb\n"), "");
        assert_eq!(line_diff("", ""), "");
    }

    #[test]
    fn changed_line_is_removed_then_added() {
        let old = "kind: X\nspec:\n  capacity: 10\n  refill: 5\n";
        let new = "kind: X\nspec:\n  capacity: 20\n  refill: 5\n";
        assert_eq!(
            line_diff(old, new),
            "  kind: X\n  spec:\n-   capacity: 10\n+   capacity: 20\n    refill: 5\n"
        );
    }

    #[test]
    fn additions_removals_and_folded_context() {
        let old: String = (1..=12).map(|i| format!("l{i}\n")).collect();
        let new = old.replace("l2\n", "").replace("l12\n", "l12\nl13\n");
        assert_eq!(
            line_diff(&old, &new),
            "  l1\n- l2\n  l3\n  l4\n  l5\n  ...\n  l10\n  l11\n  l12\n+ l13\n"
        );
        assert_eq!(line_diff("", "a\n"), "+ a\n");
        assert_eq!(line_diff("a\n", ""), "- a\n");
    }

    #[test]
    fn huge_inputs_degrade_instead_of_allocating() {
        let old: String = (0..3000).map(|i| format!("{i}\n")).collect();
        let new: String = (0..3000).map(|i| format!("{}\n", i + 1)).collect();
        let diff = line_diff(&old, &new);
        assert_eq!(diff.lines().count(), 6000);
        assert!(diff.starts_with("- 0\n"));
    }
}
