//! Word lists the task generators draw from: plain English nouns and adjectives (keys,
//! values, the common-words list) and the filler sentences of the haystack.

/// Adjectives of the needles' keys (`adjective-noun`).
pub const ADJECTIVES: [&str; 64] = [
    "ancient", "bitter", "brave", "bright", "broad", "calm", "careful", "cheerful", "clever",
    "cloudy", "crisp", "curious", "damp", "dusty", "eager", "early", "elegant", "empty", "faint",
    "fancy", "fierce", "fluffy", "fragile", "frozen", "gentle", "giant", "gleaming", "golden",
    "graceful", "grumpy", "hollow", "humble", "icy", "jolly", "keen", "lively", "lonely", "lucky",
    "mellow", "mighty", "misty", "modern", "muddy", "narrow", "noisy", "odd", "pale", "patient",
    "plain", "polite", "proud", "quiet", "rapid", "rusty", "shiny", "silent", "silver", "sleepy",
    "smooth", "sturdy", "swift", "tender", "vivid", "wooden",
];

/// Nouns: keys, word values and the common-words list.
pub const NOUNS: [&str; 128] = [
    "anchor", "apple", "arrow", "badger", "banana", "barrel", "basket", "beacon", "beetle",
    "bicycle", "blanket", "bottle", "bridge", "bucket", "butter", "cabin", "camera", "candle",
    "canyon", "carpet", "castle", "cherry", "chimney", "circus", "clock", "cloud", "compass",
    "copper", "cotton", "cradle", "crystal", "dolphin", "dragon", "drum", "eagle", "engine",
    "falcon", "feather", "fence", "fiddle", "forest", "fountain", "garden", "garlic", "glacier",
    "goat", "guitar", "hammer", "harbor", "helmet", "honey", "island", "jacket", "jungle",
    "kettle", "kitten", "ladder", "lantern", "lemon", "lizard", "magnet", "maple", "marble",
    "meadow", "mirror", "monkey", "mountain", "needle", "oyster", "paddle", "palace", "panther",
    "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "potato",
    "puzzle", "rabbit", "radio", "raven", "ribbon", "river", "rocket", "saddle", "salmon",
    "sandal", "shadow", "shovel", "spider", "spoon", "squirrel", "statue", "sugar", "sunset",
    "tablet", "teapot", "temple", "thunder", "ticket", "tiger", "tomato", "tractor", "trumpet",
    "tunnel", "turtle", "umbrella", "valley", "velvet", "violin", "wagon", "walnut", "whale",
    "whistle", "window", "wizard", "wolf", "yacht", "zebra", "acorn", "orchid", "pumpkin",
    "quartz", "ruby",
];

/// The haystack's filler: RULER's repeated noise sentences.
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
