//! Process names and paths are chosen by the process: never print them raw to a terminal.
//! A name is escaped once, as it enters ([`sanitize`]); the JSON contract carries it as it was
//! ([`unescape`]), with JSON's own `\u` escapes for what could lie ([`must_escape`]).
use std::borrow::Cow;

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
        } else if c.is_control() || must_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The name [`sanitize`] escaped, as it was (what the process chose, a lost byte of invalid
/// UTF-8 as U+FFFD): for JSON, whose writer escapes what could lie as `\uXXXX`. Borrowed when
/// nothing was escaped.
pub(crate) fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (c, used) = match after.as_bytes().first() {
            Some(b'\\') => (Some('\\'), 1),
            Some(b'n') => (Some('\n'), 1),
            Some(b't') => (Some('\t'), 1),
            Some(b'r') => (Some('\r'), 1),
            Some(b'u') => after
                .strip_prefix("u{")
                .and_then(|h| h.split_once('}'))
                .and_then(|(hex, _)| {
                    let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
                    Some((Some(c), hex.len() + 3))
                })
                .unwrap_or((None, 0)),
            _ => (None, 0),
        };
        match c {
            Some(c) => out.push(c),
            // Not one of sanitize's escapes: kept as written.
            None => out.push('\\'),
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// What a name could lie with besides controls: bidirectional controls, invisible characters
/// and separators (Unicode's Bidi_Control and Default_Ignorable characters that names have no
/// use for, and Zl/Zp), and U+FFFD (a byte that was not UTF-8).
pub(crate) fn must_escape(c: char) -> bool {
    matches!(c,
        '\u{fffd}' // replacement character
        | '\u{00ad}' // soft hyphen
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

    /// What sanitize escaped comes back as it was, whatever the name holds.
    #[test]
    fn unescape_undoes_sanitize() {
        for name in [
            "nginx",
            "a\u{202e}b\u{200b}\u{2028}\\e",
            "evil\x1b[2J\nFAKE\t\r\0",
            "a\\u{1b}b",
            "\\",
            "x\\",
            "\u{e0041}tag\u{fffd}",
            "nginx-été-日本\\n",
        ] {
            assert_eq!(super::unescape(&super::sanitize(name)), name, "{name:?}");
        }
        assert!(matches!(
            super::unescape("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
        // Not an escape sanitize makes: left as written.
        assert_eq!(super::unescape("a\\qb\\u{zz}"), "a\\qb\\u{zz}");
    }
}
