//! Password and passphrase generation for every LAPS `PasswordComplexity`.
//!
//! Complexities 1 to 5 draw characters from fixed sets, exactly those Windows LAPS uses, and every
//! password holds at least one character of each set. Complexities 6 to 8 draw words from the EFF
//! word lists and join them capitalised, with no separator. Every choice comes from a CSPRNG
//! through rejection sampling, so no character or word is more likely than another. A [`Password`]
//! never shows its value in `Debug` and has no `Display`: [`Password::expose`] is the only way to
//! read it.

use std::fmt;

use rand_core::{CryptoRng, OsRng, RngCore};
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// LAPS `PasswordComplexity`, 1 to 8: which characters or words a password is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordComplexity {
    /// 1: upper-case letters.
    UpperCase = 1,
    /// 2: upper- and lower-case letters.
    UpperLower = 2,
    /// 3: letters and digits.
    UpperLowerDigits = 3,
    /// 4: letters, digits and specials (the LAPS default).
    UpperLowerDigitsSpecials = 4,
    /// 5: like 4 without the characters that are easy to misread (`I O Q l o 0 1`), with its own
    /// specials.
    ImprovedReadability = 5,
    /// 6: a passphrase from the EFF long word list.
    PassphraseLongWords = 6,
    /// 7: a passphrase from the EFF short word list 1.
    PassphraseShortWords = 7,
    /// 8: a passphrase from the EFF short word list 2.0, whose words have unique prefixes.
    PassphraseShortWordsUniquePrefix = 8,
}

/// A generated or decrypted password.
///
/// Its `Debug` shows `Password(***)` and it has no `Display`, so it cannot slip into a log line;
/// the memory holding it is zeroed when it is dropped.
#[derive(Clone)]
pub struct Password(SecretString);

const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER: &str = "abcdefghijklmnopqrstuvwxyz";
const DIGITS: &str = "0123456789";
const SPECIALS: &str = ",.-+;!#&@{}[]$/()%";
const READABLE_UPPER: &str = "ABCDEFGHJKLMNPRSTUVWXYZ";
const READABLE_LOWER: &str = "abcdefghijkmnpqrstuvwxyz";
const READABLE_DIGITS: &str = "23456789";
const READABLE_SPECIALS: &str = "!#%+@:=?*";

const CLASSES_UPPER: &[&str] = &[UPPER];
const CLASSES_UPPER_LOWER: &[&str] = &[UPPER, LOWER];
const CLASSES_UPPER_LOWER_DIGITS: &[&str] = &[UPPER, LOWER, DIGITS];
const CLASSES_UPPER_LOWER_DIGITS_SPECIALS: &[&str] = &[UPPER, LOWER, DIGITS, SPECIALS];
const CLASSES_IMPROVED_READABILITY: &[&str] = &[READABLE_UPPER, READABLE_LOWER, READABLE_DIGITS, READABLE_SPECIALS];

impl PasswordComplexity {
    /// The complexity with this LAPS value, or `None` outside 1 to 8.
    pub fn from_value(value: i64) -> Option<Self> {
        match value {
            1 => Some(Self::UpperCase),
            2 => Some(Self::UpperLower),
            3 => Some(Self::UpperLowerDigits),
            4 => Some(Self::UpperLowerDigitsSpecials),
            5 => Some(Self::ImprovedReadability),
            6 => Some(Self::PassphraseLongWords),
            7 => Some(Self::PassphraseShortWords),
            8 => Some(Self::PassphraseShortWordsUniquePrefix),
            _ => None,
        }
    }

    /// The LAPS value, 1 to 8.
    pub fn value(self) -> u8 {
        self as u8
    }

    /// Whether this complexity makes a passphrase (6 to 8) rather than a string of characters.
    pub fn is_passphrase(self) -> bool {
        self.word_list().is_some()
    }

    /// The character classes for complexities 1 to 5, empty for passphrases.
    ///
    /// The classes of one complexity never share a character, and a password holds at least one
    /// character of each.
    pub fn character_classes(self) -> &'static [&'static str] {
        match self {
            Self::UpperCase => CLASSES_UPPER,
            Self::UpperLower => CLASSES_UPPER_LOWER,
            Self::UpperLowerDigits => CLASSES_UPPER_LOWER_DIGITS,
            Self::UpperLowerDigitsSpecials => CLASSES_UPPER_LOWER_DIGITS_SPECIALS,
            Self::ImprovedReadability => CLASSES_IMPROVED_READABILITY,
            Self::PassphraseLongWords | Self::PassphraseShortWords | Self::PassphraseShortWordsUniquePrefix => &[],
        }
    }

    /// The word list for complexities 6 to 8, `None` for 1 to 5.
    ///
    /// These are the EFF lists as EFF publishes them (from `diceware_wordlists`): 7,776 long
    /// words, and 1,296 words in each short list. Microsoft made small changes to the short lists
    /// for Windows LAPS (theirs have 1,276 words), which it does not publish separately, so a
    /// fleetlaps passphrase may use a word Windows LAPS would not. A few words hold a hyphen
    /// (`drop-down`, `felt-tip`, `t-shirt` and `yo-yo` in the long list, `yo-yo` in both short
    /// lists); they are kept as they are.
    pub fn word_list(self) -> Option<&'static [&'static str]> {
        match self {
            Self::PassphraseLongWords => Some(&diceware_wordlists::EFF_LONG_WORDLIST),
            Self::PassphraseShortWords => Some(&diceware_wordlists::EFF_SHORT_WORDLIST_1),
            Self::PassphraseShortWordsUniquePrefix => Some(&diceware_wordlists::EFF_SHORT_WORDLIST_2_0),
            Self::UpperCase
            | Self::UpperLower
            | Self::UpperLowerDigits
            | Self::UpperLowerDigitsSpecials
            | Self::ImprovedReadability => None,
        }
    }

    /// The entropy in bits of a password made with this complexity.
    ///
    /// For complexities 1 to 5 it is `length × log2(alphabet)`, where the alphabet is the union of
    /// the classes; requiring one character of each class makes the true figure slightly lower
    /// (by under 0.4 bits at the defaults). For passphrases it is `words × log2(list length)`.
    /// Lengths are raised to the same minimums [`generate`] applies.
    pub fn entropy_bits(self, password_length: u8, passphrase_length: u8) -> f64 {
        match self.word_list() {
            Some(words) => f64::from(effective_passphrase_length(passphrase_length)) * (words.len() as f64).log2(),
            None => {
                let alphabet_len: usize = self.character_classes().iter().map(|class| class.len()).sum();
                f64::from(effective_password_length(self, password_length)) * (alphabet_len as f64).log2()
            }
        }
    }
}

impl Serialize for PasswordComplexity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.value())
    }
}

impl<'de> Deserialize<'de> for PasswordComplexity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_i64(ComplexityVisitor)
    }
}

struct ComplexityVisitor;

impl Visitor<'_> for ComplexityVisitor {
    type Value = PasswordComplexity;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordComplexity, an integer from 1 to 8")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<PasswordComplexity, E> {
        PasswordComplexity::from_value(value).ok_or_else(|| E::invalid_value(de::Unexpected::Signed(value), &self))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<PasswordComplexity, E> {
        i64::try_from(value)
            .ok()
            .and_then(PasswordComplexity::from_value)
            .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(value), &self))
    }
}

impl Password {
    /// Wraps a password.
    pub fn new(value: String) -> Self {
        Self(value.into())
    }

    /// The password itself; the only way to read it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Makes a password with the operating system's CSPRNG.
///
/// `password_length` (characters) applies to complexities 1 to 5 and `passphrase_length` (words)
/// to 6 to 8; see [`generate_with`] for the rules.
pub fn generate(complexity: PasswordComplexity, password_length: u8, passphrase_length: u8) -> Password {
    generate_with(&mut OsRng, complexity, password_length, passphrase_length)
}

/// Makes a password with the given CSPRNG.
///
/// Complexities 1 to 5: `password_length` characters, at least one from each class. Every such
/// password is equally likely: the whole password is drawn from the union of the classes and
/// drawn again if a class is missing, which (unlike placing one character of each class and
/// shuffling) favours no position and no mix of classes.
///
/// Complexities 6 to 8: `passphrase_length` words, each with its first letter in upper case,
/// joined with no separator.
///
/// Policy validation keeps `password_length` within 8 to 64 and `passphrase_length` within 3 to
/// 10. Below that, lengths are raised rather than refused, so the result is never empty and can
/// always hold every class: to the number of classes (at most 4) for characters, to 1 word for
/// passphrases.
pub fn generate_with<R: RngCore + CryptoRng>(
    rng: &mut R,
    complexity: PasswordComplexity,
    password_length: u8,
    passphrase_length: u8,
) -> Password {
    match complexity.word_list() {
        Some(words) => generate_passphrase(rng, words, effective_passphrase_length(passphrase_length)),
        None => generate_characters(
            rng,
            complexity.character_classes(),
            effective_password_length(complexity, password_length),
        ),
    }
}

fn effective_password_length(complexity: PasswordComplexity, password_length: u8) -> u8 {
    let n_classes = u8::try_from(complexity.character_classes().len()).expect("invariant: at most 4 classes");
    password_length.max(n_classes)
}

fn effective_passphrase_length(passphrase_length: u8) -> u8 {
    passphrase_length.max(1)
}

fn generate_characters<R: RngCore + CryptoRng>(rng: &mut R, classes: &[&str], length: u8) -> Password {
    let alphabet: Vec<u8> = classes.iter().flat_map(|class| class.bytes()).collect();
    let mut chars = Zeroizing::new(vec![0_u8; usize::from(length)]);
    loop {
        for slot in chars.iter_mut() {
            *slot = alphabet[uniform_index(rng, alphabet.len())];
        }
        let has_every_class = classes
            .iter()
            .all(|class| chars.iter().any(|c| class.as_bytes().contains(c)));
        if has_every_class {
            break;
        }
    }
    // Exact capacity: `SecretString` takes the buffer as it is, with no copy left behind.
    let mut password = String::with_capacity(chars.len());
    password.extend(chars.iter().copied().map(char::from));
    Password::new(password)
}

fn generate_passphrase<R: RngCore + CryptoRng>(rng: &mut R, words: &[&str], n_words: u8) -> Password {
    // The indices give the passphrase away as well as the text does, so they are zeroed too.
    let chosen: Zeroizing<Vec<usize>> = Zeroizing::new((0..n_words).map(|_| uniform_index(rng, words.len())).collect());
    // Exact capacity: `SecretString` takes the buffer as it is, with no copy left behind.
    let mut passphrase = String::with_capacity(chosen.iter().map(|&index| words[index].len()).sum());
    for &index in chosen.iter() {
        let word = words[index];
        let mut word_chars = word.chars();
        if let Some(first) = word_chars.next() {
            passphrase.extend(first.to_uppercase());
            passphrase.push_str(word_chars.as_str());
        }
    }
    Password::new(passphrase)
}

/// A uniform index in `0..bound`.
///
/// Rejection sampling: a 32-bit draw at or above the largest multiple of `bound` that fits is
/// thrown away, so that taking the remainder favours no index.
fn uniform_index<R: RngCore + CryptoRng>(rng: &mut R, bound: usize) -> usize {
    assert!(bound > 0, "invariant: an index is chosen from a non-empty set");
    let bound = u64::try_from(bound).expect("invariant: usize fits in u64");
    assert!(
        bound <= 1 << 32,
        "invariant: sets (words, characters) are far below 2^32"
    );
    let zone = (1_u64 << 32) / bound * bound;
    loop {
        let draw = u64::from(rng.next_u32());
        if draw < zone {
            return usize::try_from(draw % bound).expect("invariant: below a usize bound");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A deterministic generator for tests (SplitMix64); marked `CryptoRng` only so it can stand
    /// in for the real one.
    struct TestRng(u64);

    impl RngCore for TestRng {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }

        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest);
        }

        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for TestRng {}

    /// Returns the given 32-bit values in turn, then zeros.
    struct ScriptedRng(std::collections::VecDeque<u32>);

    impl ScriptedRng {
        fn new(values: &[u32]) -> Self {
            Self(values.iter().copied().collect())
        }
    }

    impl RngCore for ScriptedRng {
        fn next_u32(&mut self) -> u32 {
            self.0.pop_front().unwrap_or(0)
        }

        fn next_u64(&mut self) -> u64 {
            u64::from(self.next_u32())
        }

        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest);
        }

        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for ScriptedRng {}

    const ALL: [PasswordComplexity; 8] = [
        PasswordComplexity::UpperCase,
        PasswordComplexity::UpperLower,
        PasswordComplexity::UpperLowerDigits,
        PasswordComplexity::UpperLowerDigitsSpecials,
        PasswordComplexity::ImprovedReadability,
        PasswordComplexity::PassphraseLongWords,
        PasswordComplexity::PassphraseShortWords,
        PasswordComplexity::PassphraseShortWordsUniquePrefix,
    ];

    #[test]
    fn values_round_trip_and_out_of_range_is_none() {
        for complexity in ALL {
            assert_eq!(
                PasswordComplexity::from_value(complexity.value().into()),
                Some(complexity)
            );
            assert_eq!(complexity.is_passphrase(), complexity.value() >= 6);
        }
        for value in [-1, 0, 9, 256, i64::MAX] {
            assert_eq!(PasswordComplexity::from_value(value), None);
        }
    }

    #[test]
    fn character_sets_are_exactly_the_laps_sets() {
        use PasswordComplexity::*;
        let upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let lower = "abcdefghijklmnopqrstuvwxyz";
        let digits = "0123456789";
        let specials = ",.-+;!#&@{}[]$/()%";
        assert_eq!(UpperCase.character_classes(), [upper]);
        assert_eq!(UpperLower.character_classes(), [upper, lower]);
        assert_eq!(UpperLowerDigits.character_classes(), [upper, lower, digits]);
        assert_eq!(
            UpperLowerDigitsSpecials.character_classes(),
            [upper, lower, digits, specials]
        );
        assert_eq!(
            ImprovedReadability.character_classes(),
            [
                "ABCDEFGHJKLMNPRSTUVWXYZ",
                "abcdefghijkmnpqrstuvwxyz",
                "23456789",
                "!#%+@:=?*"
            ]
        );
        for complexity in [
            PassphraseLongWords,
            PassphraseShortWords,
            PassphraseShortWordsUniquePrefix,
        ] {
            assert!(complexity.character_classes().is_empty());
        }
    }

    #[test]
    fn classes_are_disjoint_without_repeats() {
        for complexity in ALL {
            let all: Vec<char> = complexity
                .character_classes()
                .iter()
                .flat_map(|class| class.chars())
                .collect();
            let unique: HashSet<char> = all.iter().copied().collect();
            assert_eq!(all.len(), unique.len(), "{complexity:?}");
            assert!(all.iter().all(char::is_ascii_graphic), "{complexity:?}");
        }
    }

    #[test]
    fn word_lists_are_the_eff_lists() {
        use PasswordComplexity::*;
        let long = PassphraseLongWords.word_list().expect("a list");
        let short = PassphraseShortWords.word_list().expect("a list");
        let prefix = PassphraseShortWordsUniquePrefix.word_list().expect("a list");
        assert_eq!((long.len(), short.len(), prefix.len()), (7776, 1296, 1296));
        assert_eq!((long[0], long[7775]), ("abacus", "zoom"));
        assert_eq!((short[0], short[1295]), ("acid", "zoom"));
        assert_eq!((prefix[0], prefix[1295]), ("aardvark", "zucchini"));
        for list in [long, short, prefix] {
            assert_eq!(
                list.iter().collect::<HashSet<_>>().len(),
                list.len(),
                "no repeated word"
            );
            assert!(
                list.iter()
                    .all(|word| word.starts_with(|c: char| c.is_ascii_lowercase())
                        && word.chars().all(|c| c.is_ascii_lowercase() || c == '-')),
                "lower-case words, some with a hyphen"
            );
        }
        // The unique-prefix list: no word's first three letters start another word.
        let prefixes: HashSet<&str> = prefix.iter().map(|word| &word[..3]).collect();
        assert_eq!(prefixes.len(), prefix.len());
        for complexity in [
            UpperCase,
            UpperLower,
            UpperLowerDigits,
            UpperLowerDigitsSpecials,
            ImprovedReadability,
        ] {
            assert_eq!(complexity.word_list(), None);
        }
    }

    #[test]
    fn character_passwords_have_the_length_the_set_and_every_class() {
        let mut rng = TestRng(1);
        for complexity in ALL.into_iter().filter(|complexity| !complexity.is_passphrase()) {
            let classes = complexity.character_classes();
            for length in [8, 14, 64] {
                for _ in 0..500 {
                    let password = generate_with(&mut rng, complexity, length, 6);
                    let password = password.expose();
                    assert_eq!(password.len(), usize::from(length), "{complexity:?}");
                    assert!(
                        password.chars().all(|c| classes.iter().any(|class| class.contains(c))),
                        "{complexity:?}: a character outside the set"
                    );
                    for class in classes {
                        assert!(
                            password.chars().any(|c| class.contains(c)),
                            "{complexity:?}: {class} missing"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn os_rng_passwords_follow_the_same_rules() {
        for complexity in ALL.into_iter().filter(|complexity| !complexity.is_passphrase()) {
            let password = generate(complexity, 14, 6);
            assert_eq!(password.expose().len(), 14);
            for class in complexity.character_classes() {
                assert!(password.expose().chars().any(|c| class.contains(c)));
            }
        }
        let passphrase = generate(PasswordComplexity::PassphraseLongWords, 14, 6);
        assert!(passphrase.expose().starts_with(|c: char| c.is_ascii_uppercase()));
    }

    #[test]
    fn every_character_and_every_position_is_used() {
        // Over many passwords each allowed character turns up, and specials land in every
        // position, not only where a required class would have been placed.
        let mut rng = TestRng(2);
        let complexity = PasswordComplexity::UpperLowerDigitsSpecials;
        let mut seen = HashSet::new();
        let mut special_positions = HashSet::new();
        for _ in 0..2000 {
            let password = generate_with(&mut rng, complexity, 14, 6);
            for (position, c) in password.expose().chars().enumerate() {
                seen.insert(c);
                if SPECIALS.contains(c) {
                    special_positions.insert(position);
                }
            }
        }
        assert_eq!(seen.len(), 80);
        assert_eq!(special_positions.len(), 14);
    }

    #[test]
    fn a_password_missing_a_class_is_drawn_again() {
        // The first draw is eight 'A's, with no lower case; the second ends with 'b' (index 27 of
        // the 52 letters) and is kept.
        let mut script = vec![0; 8];
        script.extend([0; 7]);
        script.push(27);
        let password = generate_with(&mut ScriptedRng::new(&script), PasswordComplexity::UpperLower, 8, 6);
        assert_eq!(password.expose(), "AAAAAAAb");
    }

    #[test]
    fn too_short_lengths_are_raised() {
        let mut rng = TestRng(3);
        let password = generate_with(&mut rng, PasswordComplexity::UpperLowerDigitsSpecials, 0, 0);
        assert_eq!(password.expose().len(), 4);
        let passphrase = generate_with(&mut rng, PasswordComplexity::PassphraseShortWords, 0, 0);
        assert!(!passphrase.expose().is_empty());
        assert_eq!(
            PasswordComplexity::UpperLowerDigitsSpecials.entropy_bits(0, 0),
            4.0 * 80_f64.log2()
        );
    }

    /// Recovers the words a generator chose by replaying the same seed.
    fn expected_words(seed: u64, list: &[&'static str], n_words: u8) -> Vec<&'static str> {
        let mut rng = TestRng(seed);
        (0..n_words)
            .map(|_| list[uniform_index(&mut rng, list.len())])
            .collect()
    }

    #[test]
    fn passphrases_are_capitalised_list_words_joined() {
        for complexity in ALL.into_iter().filter(|complexity| complexity.is_passphrase()) {
            let list = complexity.word_list().expect("a list");
            for (seed, n_words) in [(10, 3), (11, 6), (12, 10)] {
                let passphrase = generate_with(&mut TestRng(seed), complexity, 14, n_words);
                let words = expected_words(seed, list, n_words);
                assert_eq!(words.len(), usize::from(n_words));
                let mut expected = String::new();
                for word in &words {
                    assert!(list.contains(word));
                    expected.push_str(&word[..1].to_uppercase());
                    expected.push_str(&word[1..]);
                }
                assert_eq!(passphrase.expose(), expected, "{complexity:?}");
            }
        }
    }

    #[test]
    fn passphrase_words_come_from_the_list() {
        // Without replaying the generator: strip capitalised list words off the front one by one.
        let mut rng = TestRng(4);
        let complexity = PasswordComplexity::PassphraseShortWordsUniquePrefix;
        let capitalised: Vec<String> = complexity
            .word_list()
            .expect("a list")
            .iter()
            .map(|word| format!("{}{}", word[..1].to_uppercase(), &word[1..]))
            .collect();
        for _ in 0..200 {
            let passphrase = generate_with(&mut rng, complexity, 14, 6);
            let mut rest = passphrase.expose();
            let mut n_words = 0;
            while !rest.is_empty() {
                // Unique prefixes: at most one word of the list starts the rest.
                let word = capitalised
                    .iter()
                    .find(|word| rest.starts_with(word.as_str()))
                    .expect("a list word");
                rest = &rest[word.len()..];
                n_words += 1;
            }
            assert_eq!(n_words, 6);
        }
    }

    #[test]
    fn entropy_at_the_defaults() {
        use PasswordComplexity::*;
        let close = |actual: f64, expected: f64| (actual - expected).abs() < 0.05;
        assert!(close(UpperLowerDigitsSpecials.entropy_bits(14, 6), 88.51));
        assert!(close(ImprovedReadability.entropy_bits(14, 6), 84.0));
        assert!(close(UpperCase.entropy_bits(8, 6), 37.60));
        assert!(close(PassphraseLongWords.entropy_bits(14, 6), 77.55));
        assert!(close(PassphraseShortWords.entropy_bits(14, 6), 62.04));
        assert!(close(PassphraseShortWordsUniquePrefix.entropy_bits(14, 6), 62.04));
        assert!(close(PassphraseLongWords.entropy_bits(64, 10), 129.25));
    }

    #[test]
    fn uniform_index_stays_in_range_and_rejects_the_biased_zone() {
        // For bound 3 the zone is [0, 4294967295): u32::MAX itself is rejected.
        let mut rng = ScriptedRng::new(&[u32::MAX, u32::MAX, 7]);
        assert_eq!(uniform_index(&mut rng, 3), 1);
        for bound in [1, 2, 3, 7, 80, 1296, 7776] {
            for draw in [0, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                assert!(uniform_index(&mut ScriptedRng::new(&[draw]), bound) < bound);
            }
        }
        let mut rng = TestRng(5);
        for bound in [1, 5, 26, 80, 1296, 7776] {
            for _ in 0..10_000 {
                assert!(uniform_index(&mut rng, bound) < bound);
            }
        }
    }

    #[test]
    fn debug_does_not_show_the_password() {
        let password = Password::new("hunter2-Secret".to_owned());
        let debug = format!("{password:?}");
        assert_eq!(debug, "Password(***)");
        assert!(!debug.contains(password.expose()));
        let copy = password.clone();
        drop(password);
        assert_eq!(copy.expose(), "hunter2-Secret");
    }

    #[test]
    fn complexity_serialises_as_its_number() {
        for complexity in ALL {
            let json = serde_json::to_string(&complexity).expect("serialises");
            assert_eq!(json, complexity.value().to_string());
            assert_eq!(
                serde_json::from_str::<PasswordComplexity>(&json).expect("parses"),
                complexity
            );
        }
        for bad in ["0", "9", "-1", "\"4\"", "4.5"] {
            let err = serde_json::from_str::<PasswordComplexity>(bad)
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("PasswordComplexity") && err.contains("1 to 8"),
                "{bad}: {err}"
            );
        }
    }
}
