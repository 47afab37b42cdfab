// nnp prints its effective user id. critest's NoNewPrivs specs run it from an
// image where it is installed setuid root: with no_new_privs off it prints 0.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
