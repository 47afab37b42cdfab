"""spinboxd: owns every VM and serves org.spinstack.Spinbox on the system bus."""
