//! The version matrix's CI subset (see `versions`), a test per pair, so
//! that the six share the test threads. They sort last: started first,
//! beside the crash and cutover tests, one pair fell behind on two cores.

/// The CI subset, a test per pair so that they run beside the others.
macro_rules! ci_pairs {
    ($($name:ident: $source:literal -> $target:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                crate::versions::report_pair($source, $target);
            }
        )*

        #[test]
        fn the_ci_pairs_are_the_ones_ci_runs() {
            assert_eq!([$(($source, $target)),*], crate::versions::CI_PAIRS);
        }
    };
}

ci_pairs! {
    pair_10_to_17: 10 -> 17,
    pair_12_to_18: 12 -> 18,
    pair_13_to_17: 13 -> 17,
    pair_16_to_18: 16 -> 18,
    pair_17_to_17: 17 -> 17,
    pair_18_to_18: 18 -> 18,
}
