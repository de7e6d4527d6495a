//! The harness's scenario files: `parse` and `lint` never panic on any text, and every error
//! they report names the file it was given.
#![no_main]

use std::path::Path;

use buildplane_harness::lint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A path under scenarios/ as the real files have, so `lint`'s file checks look there.
    let file = Path::new("scenarios/fuzz.yaml");
    match lint::parse(file, text) {
        Ok(scenario) => {
            for error in lint::lint(file, text, &scenario) {
                assert_eq!(error.file, file);
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal says why");
            assert!(errors.iter().all(|e| e.file == file));
        }
    }
});
