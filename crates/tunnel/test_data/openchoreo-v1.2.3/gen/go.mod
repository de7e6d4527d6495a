module ocgolden

go 1.24
