//! What `--mode` asks for and how each kind of hook ended up attached, with the names the start
//! event, the metrics and the human start line give them.
use std::fmt;

/// An enum whose variants are named in the output, one name each: `name()`, `Display` and
/// `Serialize` all give it, so the JSON, the metrics labels and the human line cannot diverge.
/// The default (`#[default]`) is the one preferred: `--mode`'s, and the hook tried first.
macro_rules! named {
    (
        $(#[$meta:meta])*
        pub(crate) enum $enum:ident {
            $($(#[$vmeta:meta])* $variant:ident => $name:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub(crate) enum $enum {
            $($(#[$vmeta])* $variant,)+
        }

        impl $enum {
            /// Every variant, in declaration order.
            #[cfg(test)]
            pub(crate) const ALL: &[Self] = &[$(Self::$variant),+];

            /// The name in the output.
            pub(crate) const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }

        impl fmt::Display for $enum {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl serde::Serialize for $enum {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    };
}

named! {
    /// How calls are tied to the sockets they end: asked for with `--mode`, and, once loaded,
    /// the one that runs (`Precise` or `Correlated`; never `Auto`).
    pub(crate) enum Mode {
        /// Precise where the kernel allows it, else correlated.
        #[default]
        Auto => "auto",
        /// Hook tcp_close/tcp_shutdown (fentry, else kprobes); fail if the kernel refuses both.
        Precise => "precise",
        /// Syscall tracepoints only, matched to state changes by socket identity.
        Correlated => "correlated",
    }
}

named! {
    /// How TCP state changes are hooked.
    pub(crate) enum StateHook {
        /// The BTF tracepoint (skipped only for itself, and a second copy catches that).
        #[default]
        TpBtf => "tp_btf",
        /// The classic tracepoint, skipped while any BPF program holds the CPU.
        Tracepoint => "tracepoint",
    }
}

named! {
    /// Precise mode's hook on tcp_close/tcp_shutdown.
    pub(crate) enum CallHook {
        #[default]
        Fentry => "fentry",
        Kprobe => "kprobe",
    }
}

named! {
    /// How the syscalls finwait follows are hooked.
    pub(crate) enum SyscallHook {
        /// Every one as the guarded pair on its syscall wrapper.
        #[default]
        Fentry => "fentry",
        /// Every one as its classic syscall tracepoint.
        Tracepoint => "tracepoint",
        /// Some each way.
        Mixed => "mixed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(v: impl serde::Serialize) -> String {
        serde_json::to_string(&v).unwrap()
    }

    /// The names README.md documents and the integration tests read, byte for byte.
    #[test]
    fn names_in_the_output_are_the_documented_ones() {
        let names = |all: &[&'static str]| all.join(",");
        let mode: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names(&mode), "auto,precise,correlated");
        let state: Vec<_> = StateHook::ALL.iter().map(|h| h.name()).collect();
        assert_eq!(names(&state), "tp_btf,tracepoint");
        let call: Vec<_> = CallHook::ALL.iter().map(|h| h.name()).collect();
        assert_eq!(names(&call), "fentry,kprobe");
        let syscall: Vec<_> = SyscallHook::ALL.iter().map(|h| h.name()).collect();
        assert_eq!(names(&syscall), "fentry,tracepoint,mixed");
        assert_eq!(json(Some(CallHook::Kprobe)), r#""kprobe""#);
        assert_eq!(json(None::<CallHook>), "null");
        assert_eq!(json(StateHook::TpBtf), r#""tp_btf""#);
        assert_eq!(format!("{}", Mode::Precise), "precise");
    }
}
