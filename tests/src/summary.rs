//! Recognising the kernel's JSON summary line.

use serde_json::Value;

/// Parses `line` as the kernel's summary: a JSON object whose `"event"` is `"summary"`.
///
/// Surrounding whitespace (including the `\r` of a CRLF line end) is ignored; anything else
/// on the line makes it not a summary line.
pub fn parse_summary_line(line: &str) -> Option<Value> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    let value: Value = serde_json::from_str(line).ok()?;
    (value.get("event")? == "summary").then_some(value)
}

/// Finds the summary in a run's serial lines, enforcing the contract: exactly one summary
/// line, and it is the last non-blank line.
///
/// Returns the parsed summary, or the reason why there is no acceptable one.
pub fn find_summary<S: AsRef<str>>(lines: &[S]) -> Result<Value, String> {
    let summaries: Vec<(usize, Value)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| parse_summary_line(l.as_ref()).map(|v| (i, v)))
        .collect();
    let last_non_blank = lines.iter().rposition(|l| !l.as_ref().trim().is_empty());
    match summaries.as_slice() {
        [] => Err(
            "no summary line (JSON object with \"event\":\"summary\") on the serial console"
                .to_string(),
        ),
        [(i, value)] => {
            if Some(*i) == last_non_blank {
                Ok(value.clone())
            } else {
                let (i, n) = (i + 1, last_non_blank.map_or(0, |l| l + 1));
                Err(format!(
                    "the summary line is not the last line (it is line {i}, the last non-blank line is {n})"
                ))
            }
        }
        many => Err(format!(
            "{} summary lines on the serial console (lines {}); the contract says exactly one",
            many.len(),
            many.iter()
                .map(|(i, _)| (i + 1).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_summary_line() {
        let v = parse_summary_line("{\"event\":\"summary\",\"outcome\":\"ok\"}\r").unwrap();
        assert_eq!(v["outcome"], "ok");
        assert!(parse_summary_line("  {\"event\": \"summary\"}  ").is_some());
    }

    #[test]
    fn rejects_other_lines() {
        assert!(parse_summary_line("").is_none());
        assert!(parse_summary_line("INFO booting").is_none());
        assert!(parse_summary_line("{\"event\":\"boot\"}").is_none());
        assert!(parse_summary_line("{\"outcome\":\"ok\"}").is_none());
        assert!(parse_summary_line("{\"event\":\"summary\"").is_none());
        assert!(parse_summary_line("x {\"event\":\"summary\"}").is_none());
        assert!(parse_summary_line("[{\"event\":\"summary\"}]").is_none());
    }

    #[test]
    fn summary_must_be_last_non_blank_line() {
        let ok = ["log", "{\"event\":\"summary\"}", "", "  "];
        assert!(find_summary(&ok).is_ok());
        let late = ["log", "{\"event\":\"summary\"}", "more log"];
        let err = find_summary(&late).unwrap_err();
        assert!(err.contains("not the last line"), "{err}");
    }

    #[test]
    fn missing_or_duplicate_summary_is_reported() {
        let none = ["log", "more"];
        assert!(find_summary(&none).unwrap_err().contains("no summary"));
        let empty: [&str; 0] = [];
        assert!(find_summary(&empty).unwrap_err().contains("no summary"));
        let two = ["{\"event\":\"summary\"}", "{\"event\":\"summary\"}"];
        assert!(find_summary(&two).unwrap_err().contains("2 summary lines"));
    }
}
