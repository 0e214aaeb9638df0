//! Process names and paths are chosen by the process: never print them raw to a terminal.

/// Replaces what a name could use to lie with visible escapes: control characters (escape
/// sequences, newlines), invalid UTF-8, the bidirectional controls (which reorder the rest of a
/// line), the invisible characters (which make two names look alike) and the line and
/// paragraph separators (which some readers split JSON lines at); and doubles a backslash, so
/// a name holding the text `\u{1b}` cannot pass for an escape.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || c == '\u{fffd}' || deceptive(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Bidirectional controls, invisible characters and separators (Unicode's Bidi_Control and
/// Default_Ignorable characters that names have no use for, and Zl/Zp).
fn deceptive(c: char) -> bool {
    matches!(c,
        '\u{00ad}' // soft hyphen
        | '\u{061c}' // Arabic letter mark
        | '\u{115f}' | '\u{1160}' | '\u{3164}' | '\u{ffa0}' // Hangul fillers
        | '\u{180e}' // Mongolian vowel separator
        | '\u{200b}'..='\u{200f}' // zero-width space, joiners, LRM, RLM
        | '\u{2028}' | '\u{2029}' // line and paragraph separators
        | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
        | '\u{2060}'..='\u{206f}' // word joiner, invisible operators, bidi isolates
        | '\u{feff}' // zero-width no-break space (BOM)
        | '\u{fff9}'..='\u{fffb}' // interlinear annotation
        | '\u{e0000}'..='\u{e007f}' // tags
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_terminal_controls() {
        assert_eq!(super::sanitize("evil\x1b[2J\nx"), "evil\\u{1b}[2J\\nx");
        assert_eq!(super::sanitize("nginx: worker"), "nginx: worker");
    }

    #[test]
    fn escapes_what_makes_a_name_lie() {
        let s = super::sanitize;
        assert_eq!(s("abc\u{202e}gpj.exe"), "abc\\u{202e}gpj.exe");
        assert_eq!(s("ngi\u{200b}nx"), "ngi\\u{200b}nx");
        assert_eq!(
            s("\u{feff}x\u{2028}y\u{2029}"),
            "\\u{feff}x\\u{2028}y\\u{2029}"
        );
        // A name that holds the text of an escape is not one.
        assert_eq!(s("a\\u{1b}b"), "a\\\\u{1b}b");
        // Other scripts are names like any.
        assert_eq!(s("nginx-été-日本"), "nginx-été-日本");
    }
}
